//! `PostgresStore` connected as a role that may only read and write the
//! table's rows, the table made beforehand by a role that may create it
//! (`IDEMPOTENT_TEST_POSTGRES_URL`, as a superuser). Each test makes a
//! role and a table of its own, and drops both.

mod store_support;

use std::future::Future;
use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::clock::ManualClock;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, Store};
use idempotent_core::testing::contract;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use store_support::{Ledger, backend_url, pay, payments_app, unique_name};

const URL: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
/// What the service's role is granted on the table.
const ROW_PRIVILEGES: &str = "SELECT, INSERT, UPDATE, DELETE";

/// What a test's role finds before the store runs.
enum Table {
    /// None: the role may not make it.
    Missing,
    /// Made with `PostgresStore::migration_sql`, the role granted
    /// `privileges` on it.
    Migrated { privileges: &'static str },
    /// Made without its index, the role granted every row privilege.
    WithoutIndex,
}

/// A role of its own (no `CREATE` anywhere, as PostgreSQL 15 gives a new
/// role) and a table name of its own.
struct Setup {
    admin: PgPool,
    role_pool: PgPool,
    table: String,
    role: String,
}

impl Setup {
    /// The role and `table`, as the superuser of `url` makes them.
    async fn new(url: &str, table: Table) -> Self {
        let admin = PgPool::connect(url)
            .await
            .expect("connect as the superuser");
        let name = unique_name("idem_rows");
        let (table_name, role) = (name.clone(), format!("{name}_role"));
        run(&admin, &format!("CREATE ROLE {role} LOGIN")).await;
        let migration = PostgresStore::migration_sql(&table_name).expect("valid table name");
        match table {
            Table::Missing => {}
            Table::Migrated { privileges } => {
                run(&admin, &migration).await;
                run(
                    &admin,
                    &format!("GRANT {privileges} ON {table_name} TO {role}"),
                )
                .await;
            }
            Table::WithoutIndex => {
                let create_table = &migration[..migration.find("CREATE INDEX").expect("an index")];
                run(&admin, create_table).await;
                let grant = format!("GRANT {ROW_PRIVILEGES} ON {table_name} TO {role}");
                run(&admin, &grant).await;
            }
        }
        let options: PgConnectOptions = url.parse().expect("valid URL");
        let role_pool = PostgresStore::pool_options()
            .max_connections(4)
            .connect_with(options.username(&role))
            .await
            .expect("connect as the role");
        Self {
            admin,
            role_pool,
            table: table_name,
            role,
        }
    }

    /// A store on the table, connected as the role.
    fn store(&self, clock: ManualClock) -> PostgresStore {
        PostgresStore::builder(self.role_pool.clone())
            .table(self.table.as_str())
            .clock(clock)
            .build()
            .expect("valid table name")
    }

    /// Runs `test`, then drops the table and the role whatever it found,
    /// then hands back what it found.
    async fn around<T>(self, test: impl Future<Output = T>) -> T {
        let outcome = test.await;
        self.role_pool.close().await;
        let drop = format!(
            "DROP TABLE IF EXISTS {table}; DROP ROLE {role}",
            table = self.table,
            role = self.role
        );
        run(&self.admin, &drop).await;
        self.admin.close().await;
        outcome
    }
}

async fn run(pool: &PgPool, statements: &str) {
    sqlx::raw_sql(statements)
        .execute(pool)
        .await
        .unwrap_or_else(|error| panic!("run `{statements}`: {error}"));
}

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("valid key"),
    )
}

fn assert_says(error: &str, words: &[&str]) {
    for word in words {
        assert!(error.contains(word), "`{word}` missing from: {error}");
    }
}

/// `CREATE TABLE IF NOT EXISTS` needs `CREATE` on the schema even when
/// the table exists, so `migrate` failed at every start of a service
/// whose role may only read and write rows. It now finds the table and
/// its index and creates nothing, and the role serves requests: claims,
/// completions, replays, renewals, releases and purges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_that_may_only_read_and_write_rows_migrates_and_serves_requests() {
    let Some(url) = backend_url(URL) else { return };
    let privileges = ROW_PRIVILEGES;
    let setup = Setup::new(&url, Table::Migrated { privileges }).await;
    let clock = ManualClock::starting_now();
    let store = setup.store(clock.clone());
    let (contract_store, app_store) = (store.clone(), store.clone());
    let (migrated, purged, replies, ledger) = setup
        .around(async move {
            let migrated = store.migrate().await.map_err(|error| error.to_string());
            if migrated.is_err() {
                return (migrated, Ok(0), Vec::new(), Ledger::default());
            }
            contract::run_all(|clock| {
                let store = PostgresStore::builder(contract_store.pool().clone())
                    .table(contract_store.table())
                    .clock(clock)
                    .build()
                    .expect("valid table name");
                async move { store }
            })
            .await;
            let ledger = Ledger::default();
            let app = payments_app(app_store, &ledger, Duration::from_secs(5));
            let replies = vec![pay(&app, "pay-1", 100).await, pay(&app, "pay-1", 100).await];
            let lease = Duration::from_secs(1);
            let key = record_key("expiring");
            let fingerprint = Fingerprint::from_bytes([7; 32]);
            let claimed = store.claim(&key, fingerprint, lease).await.expect("claim");
            assert!(
                matches!(claimed, Claim::Acquired(_)),
                "a new key is acquired"
            );
            clock.advance(Duration::from_secs(3600 * 24 * 365));
            let purged = store
                .purge_expired()
                .await
                .map_err(|error| error.to_string());
            (migrated, purged, replies, ledger)
        })
        .await;
    migrated.expect("migrate finds the table and creates nothing");
    assert!(
        purged.expect("the role may purge") >= 2,
        "the expired claim and the stored payment are purged"
    );
    assert_eq!(replies[0].status, StatusCode::CREATED);
    assert!(replies[1].replayed(), "the second payment is a replay");
    assert_eq!(ledger.executions(), 1, "the payment ran once");
}

/// The same role with no table to find: `migrate` says what to grant, or
/// to run it as a role that may create the table.
#[tokio::test]
async fn a_role_that_may_only_read_and_write_rows_is_told_to_grant_create_for_a_missing_table() {
    let Some(url) = backend_url(URL) else { return };
    let setup = Setup::new(&url, Table::Missing).await;
    let store = setup.store(ManualClock::starting_now());
    let table = setup.table.clone();
    let migrated = setup.around(async move { store.migrate().await }).await;
    let error = migrated.expect_err("the role may not create the table");
    assert_says(
        &error.to_string(),
        &[
            &table,
            "GRANT CREATE ON SCHEMA public",
            "SELECT, INSERT, UPDATE and DELETE",
        ],
    );
}

/// A role lacking some of the row privileges was told to grant `CREATE`
/// on the schema, which would not have helped; every request then failed.
/// `migrate` names the privileges it lacks and the `GRANT` to run.
#[tokio::test]
async fn a_role_lacking_row_privileges_is_told_which_to_grant_by_migrate() {
    let Some(url) = backend_url(URL) else { return };
    let privileges = "SELECT, INSERT";
    let setup = Setup::new(&url, Table::Migrated { privileges }).await;
    let store = setup.store(ManualClock::starting_now());
    let (table, role) = (setup.table.clone(), setup.role.clone());
    let migrated = setup.around(async move { store.migrate().await }).await;
    let error = migrated.expect_err("the role may not update or delete");
    assert_says(
        &error.to_string(),
        &[
            &format!("the role `{role}` may not use the table `{table}`"),
            "lacks UPDATE, DELETE",
            &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}"),
        ],
    );
}

/// A table made without its index: the role, which is not its owner, may
/// not create the index, and `migrate` says who may and with what SQL
/// (it said to grant `CREATE` on the schema, which would not have helped).
#[tokio::test]
async fn a_missing_index_the_role_may_not_create_names_the_owner() {
    let Some(url) = backend_url(URL) else { return };
    let setup = Setup::new(&url, Table::WithoutIndex).await;
    let store = setup.store(ManualClock::starting_now());
    let table = setup.table.clone();
    let migrated = setup.around(async move { store.migrate().await }).await;
    let error = migrated.expect_err("the role may not create the index");
    assert_says(
        &error.to_string(),
        &[
            &format!("the table `{table}` has no index on `expires_at`"),
            &format!("PostgresStore::migration_sql(\"{table}\")"),
            "as the table's owner",
        ],
    );
}

/// The table's owner, given the table without its index: `migrate`
/// creates the index alone.
#[tokio::test]
async fn the_owner_migrating_a_table_without_its_index_creates_the_index() {
    let Some(url) = backend_url(URL) else { return };
    let setup = Setup::new(&url, Table::WithoutIndex).await;
    let owner = PostgresStore::builder(setup.admin.clone())
        .table(setup.table.as_str())
        .build()
        .expect("valid table name");
    let admin = setup.admin.clone();
    let table = setup.table.clone();
    let (migrated, indexes) = setup
        .around(async move {
            let migrated = owner.migrate().await.map_err(|error| error.to_string());
            let indexes: Vec<String> =
                sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = $1")
                    .bind(&table)
                    .fetch_all(&admin)
                    .await
                    .expect("read the indexes");
            (migrated, indexes)
        })
        .await;
    migrated.expect("the owner may create the index");
    assert!(
        indexes.iter().any(|index| index.ends_with("(expires_at)")),
        "{indexes:?}"
    );
}

/// A table name the builder refuses is refused here too, rather than
/// spliced into SQL. Needs no server.
#[test]
fn migration_sql_refuses_what_the_builder_refuses() {
    for table in ["records; DROP TABLE users", "pg_temp.records", "a.b.c"] {
        assert!(PostgresStore::migration_sql(table).is_err(), "{table}");
    }
    let sql = PostgresStore::migration_sql("App.Records").expect("valid name");
    assert!(
        sql.contains("CREATE TABLE IF NOT EXISTS \"app\".\"records\""),
        "{sql}"
    );
    assert!(sql.contains("\"records_expires_at_idx\""), "{sql}");
    assert!(sql.contains("ON \"app\".\"records\" (expires_at)"), "{sql}");
}
