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
use idempotent_core::store::{PostgresStore, Store, StoreError};
use idempotent_core::testing::contract;
use sqlx::ConnectOptions;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use store_support::{Ledger, backend_url, pay, payments_app, suggested_sql, unique_name};

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
    /// Made with `PostgresStore::migration_sql` in a schema of its own,
    /// the role granted every row privilege on it but no `USAGE` on the
    /// schema.
    InSchemaWithoutUsage,
    /// Made with `PostgresStore::migration_sql` as `order.order`, schema
    /// and table named with a reserved word (in a database of the test's
    /// own); the role granted nothing on either.
    ReservedWordInSchemaWithoutGrants,
}

/// A role of its own (no `CREATE` anywhere, as PostgreSQL 15 gives a new
/// role) and a table name of its own.
struct Setup {
    admin: PgPool,
    role_pool: PgPool,
    table: String,
    role: String,
    /// The schema made for the table, if any.
    schema: Option<String>,
}

impl Setup {
    /// The role and `table`, as the superuser of `url` makes them.
    async fn new(url: &str, table: Table) -> Self {
        let admin = PgPool::connect(url)
            .await
            .expect("connect as the superuser");
        let name = unique_name("idem_rows");
        let role = format!("{name}_role");
        let reserved = matches!(table, Table::ReservedWordInSchemaWithoutGrants);
        let in_schema = reserved || matches!(table, Table::InSchemaWithoutUsage);
        let schema = match reserved {
            true => Some("order".to_owned()),
            false => in_schema.then(|| format!("{name}_schema")),
        };
        let base = if reserved { "order" } else { "records" };
        let table_name = match &schema {
            Some(schema) => format!("{schema}.{base}"),
            None => name.clone(),
        };
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
            Table::InSchemaWithoutUsage => {
                let schema = schema.as_deref().expect("a schema");
                run(&admin, &format!("CREATE SCHEMA {schema}")).await;
                run(&admin, &migration).await;
                let grant = format!("GRANT {ROW_PRIVILEGES} ON {table_name} TO {role}");
                run(&admin, &grant).await;
            }
            Table::ReservedWordInSchemaWithoutGrants => {
                let schema = quoted_table(schema.as_deref().expect("a schema"));
                run(&admin, &format!("CREATE SCHEMA {schema}")).await;
                run(&admin, &migration).await;
            }
        }
        let role_pool = role_pool(url, &role).await;
        Self {
            admin,
            role_pool,
            table: table_name,
            role,
            schema,
        }
    }

    /// Runs `statement` as the superuser, then connects the role anew, so
    /// that settings of the role it changed apply to its sessions. An
    /// error is handed back, so that the role and table are still dropped.
    async fn as_admin_then_reconnect(&mut self, url: &str, statement: &str) -> Result<(), String> {
        try_run(&self.admin, statement).await?;
        self.role_pool.close().await;
        self.role_pool = role_pool(url, &self.role).await;
        Ok(())
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
        let mut drop = format!(
            "DROP TABLE IF EXISTS {table}; DROP OWNED BY {role}; DROP ROLE {role};",
            table = quoted_table(&self.table),
            role = self.role
        );
        if let Some(schema) = &self.schema {
            drop += &format!("DROP SCHEMA {};", quoted_table(schema));
        }
        run(&self.admin, &drop).await;
        self.admin.close().await;
        outcome
    }
}

/// A pool of the store's settings, connected as `role`.
async fn role_pool(url: &str, role: &str) -> PgPool {
    let options: PgConnectOptions = url.parse().expect("valid URL");
    PostgresStore::pool_options()
        .max_connections(4)
        .connect_with(options.username(role))
        .await
        .expect("connect as the role")
}

async fn run(pool: &PgPool, statements: &str) {
    try_run(pool, statements)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
}

async fn try_run(pool: &PgPool, statements: &str) -> Result<(), String> {
    match sqlx::raw_sql(statements).execute(pool).await {
        Ok(_) => Ok(()),
        Err(error) => Err(format!("run `{statements}`: {error}")),
    }
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
            "GRANT CREATE ON SCHEMA \"public\"",
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
            &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON \"{table}\" TO {role}"),
        ],
    );
}

/// One claim of a new key.
async fn claim(store: &PostgresStore) -> Result<Claim, StoreError> {
    let key = record_key("k");
    store
        .claim(
            &key,
            Fingerprint::from_bytes([1; 32]),
            Duration::from_secs(60),
        )
        .await
}

/// A role without `USAGE` on the schema of the table was told to grant
/// `CREATE` on it, which would not have helped: `migrate` names the
/// schema and the `GRANT USAGE` to run, that `GRANT` lets it migrate, and
/// requests meanwhile name `USAGE` too. Both are a setup to change, not
/// an outage.
#[tokio::test]
async fn a_role_without_usage_on_the_tables_schema_is_told_to_grant_usage() {
    let Some(url) = backend_url(URL) else { return };
    let setup = Setup::new(&url, Table::InSchemaWithoutUsage).await;
    let store = setup.store(ManualClock::starting_now());
    let schema = setup.schema.clone().expect("a schema");
    let (table, role, admin) = (setup.table.clone(), setup.role.clone(), setup.admin.clone());
    let (migrated, claimed, granted, migrated_after_grant) = setup
        .around(async move {
            let migrated = store.migrate().await;
            let claimed = claim(&store).await;
            let Err(error) = &migrated else {
                return (migrated, claimed, String::new(), Ok(()));
            };
            let grant = suggested_sql(&error.to_string()).to_owned();
            let migrated_after_grant = match try_run(&admin, &grant).await {
                Ok(()) => store.migrate().await.map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            (migrated, claimed, grant, migrated_after_grant)
        })
        .await;
    let error = migrated.expect_err("the role may not use the schema");
    assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
    let error = error.to_string();
    assert_says(
        &error,
        &[
            &format!("the role `{role}` may not use the schema `{schema}` of the table `{table}`"),
            "lacks USAGE",
        ],
    );
    assert!(!error.contains("CREATE"), "{error}");
    assert_eq!(
        granted,
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO {role}")
    );
    migrated_after_grant.expect("the suggested GRANT is all the role lacked");
    let claimed = claimed.expect_err("the role may not use the schema");
    assert!(
        matches!(claimed, StoreError::Misconfigured(_)),
        "{claimed:?}"
    );
    assert_says(
        &claimed.to_string(),
        &[
            &format!("permission denied for schema {schema}"),
            "USAGE on the table's schema",
        ],
    );
}

/// `table` as SQL text: each part quoted, as the store quotes it.
fn quoted_table(table: &str) -> String {
    let parts: Vec<String> = table.split('.').map(|part| format!("\"{part}\"")).collect();
    parts.join(".")
}

/// The `GRANT`s `migrate` suggested named the table and its schema
/// unquoted, so for a schema or table named with a reserved word
/// (`order`) the suggested `GRANT USAGE ON SCHEMA order ...` was a syntax
/// error. They quote both as the store's statements do, and running them
/// is all the role lacks. In a database of its own, where `order` is free.
#[tokio::test]
async fn the_grants_suggested_for_a_table_named_with_a_reserved_word_run() {
    let Some(url) = backend_url(URL) else { return };
    let cluster = PgPool::connect(&url)
        .await
        .expect("connect as the superuser");
    let database = unique_name("idem_reserved");
    run(&cluster, &format!("CREATE DATABASE {database}")).await;
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let database_url = options.database(&database).to_url_lossy().to_string();
    let (suggested, outcome, schema, role) = grants_suggested_in(&database_url).await;
    run(&cluster, &format!("DROP DATABASE {database} WITH (FORCE)")).await;
    cluster.close().await;
    let claimed = outcome.expect("the suggested GRANTs run and are all the role lacked");
    assert!(matches!(claimed, Claim::Acquired(_)), "{claimed:?}");
    assert_eq!(
        suggested,
        [
            format!("GRANT USAGE ON SCHEMA \"{schema}\" TO {role}"),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON \"{schema}\".\"order\" TO {role}"),
        ]
    );
}

/// What `migrate` suggests, one `GRANT` after another, for `order.order`
/// in the database of `url`, and what a claim then finds; with the schema
/// and the role.
async fn grants_suggested_in(url: &str) -> (Vec<String>, Result<Claim, String>, String, String) {
    let setup = Setup::new(url, Table::ReservedWordInSchemaWithoutGrants).await;
    let store = setup.store(ManualClock::starting_now());
    let schema = setup.schema.clone().expect("a schema");
    let (role, admin) = (setup.role.clone(), setup.admin.clone());
    let (suggested, outcome) = setup
        .around(async move {
            let mut suggested = Vec::new();
            // One GRANT for the schema, one for the table, and no more.
            for _ in 0..3 {
                let Err(error) = store.migrate().await else {
                    let claimed = claim(&store).await.map_err(|error| error.to_string());
                    return (suggested, claimed);
                };
                let grant = suggested_sql(&error.to_string()).to_owned();
                suggested.push(grant.clone());
                if let Err(error) = try_run(&admin, &grant).await {
                    return (suggested, Err(error));
                }
            }
            (suggested, Err("migrate still fails".to_owned()))
        })
        .await;
    (suggested, outcome, schema, role)
}

/// A role whose transactions are read-only (`default_transaction_read_only`,
/// as on a hot standby) passed `migrate`, which only reads when the table
/// is there, and every claim then failed on "cannot execute INSERT in a
/// read-only transaction". `migrate` refuses it with the `ALTER ROLE` to
/// run, which lets the role serve; requests name the setting too, as an
/// outage (a 503 that asks for a retry soon): a request cannot tell it
/// from the old primary of a failover, a standby until the store reaches
/// the new one.
#[tokio::test]
async fn a_role_whose_transactions_are_read_only_is_told_so() {
    let Some(url) = backend_url(URL) else { return };
    let privileges = ROW_PRIVILEGES;
    let mut setup = Setup::new(&url, Table::Migrated { privileges }).await;
    let role = setup.role.clone();
    let read_only = format!("ALTER ROLE {role} SET default_transaction_read_only = on");
    let made_read_only = setup.as_admin_then_reconnect(&url, &read_only).await;
    let store = setup.store(ManualClock::starting_now());
    let (migrated, claimed) = (store.migrate().await, claim(&store).await);
    let suggested = match &migrated {
        Err(error) => suggested_sql(&error.to_string()).to_owned(),
        Ok(()) => String::new(),
    };
    let applied = setup.as_admin_then_reconnect(&url, &suggested).await;
    let store = setup.store(ManualClock::starting_now());
    let fixed = setup
        .around(async move {
            store.migrate().await?;
            claim(&store).await
        })
        .await;
    made_read_only.expect("make the role's transactions read-only");
    let error = migrated.expect_err("the role takes no writes");
    assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
    assert_says(&error.to_string(), &["transactions are read-only"]);
    assert_eq!(
        suggested,
        format!("ALTER ROLE {role} SET default_transaction_read_only = off")
    );
    let claimed = claimed.expect_err("the role takes no writes");
    assert!(matches!(claimed, StoreError::Backend(_)), "{claimed:?}");
    assert_says(
        &claimed.to_string(),
        &[
            "read-only transaction",
            "failover",
            "default_transaction_read_only",
        ],
    );
    applied.expect("run the suggested ALTER ROLE");
    let fixed = fixed.expect("the suggested ALTER ROLE is all the role lacked");
    assert!(matches!(fixed, Claim::Acquired(_)));
}

/// How many connections the failover test's pool opens: all of them
/// read-only before the role's setting flips.
const FAILOVER_POOL_SIZE: u32 = 2;

/// A pool of `size` connections as `role`, every one of them open: the
/// connections the store keeps and those idle in the pool all began under
/// the role's settings of now. Hands back whether each is read-only.
async fn opened_pool(url: &str, role: &str, size: u32) -> (PgPool, Vec<String>) {
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let pool = PostgresStore::pool_options()
        .max_connections(size)
        .connect_with(options.username(role))
        .await
        .expect("connect as the role");
    let mut held = Vec::new();
    let mut read_only = Vec::new();
    for _ in 0..size {
        let mut connection = pool.acquire().await.expect("open a connection");
        let setting: String = sqlx::query_scalar("SHOW transaction_read_only")
            .fetch_one(&mut *connection)
            .await
            .expect("read the session's setting");
        read_only.push(setting);
        held.push(connection);
    }
    drop(held);
    (pool, read_only)
}

/// After a failover the old primary comes back as a hot standby, and the
/// store's connections to it answered every write with "cannot execute
/// INSERT in a read-only transaction" (SQLSTATE 25006). Each went back to
/// the pool (or stayed kept), so requests failed with 503s until the pool
/// retired the connection, 30 minutes later by default, even once new
/// connections reached the new primary. Here every connection of the pool
/// is a read-only session of a role whose new sessions may write: each
/// fails one claim and is closed, and the next claim on a new connection
/// is acquired.
#[tokio::test]
async fn connections_to_a_server_that_turned_read_only_are_closed_not_reused() {
    let Some(url) = backend_url(URL) else { return };
    let privileges = ROW_PRIVILEGES;
    let setup = Setup::new(&url, Table::Migrated { privileges }).await;
    let (role, table, admin) = (setup.role.clone(), setup.table.clone(), setup.admin.clone());
    let read_only = format!("ALTER ROLE {role} SET default_transaction_read_only = on");
    let writable = format!("ALTER ROLE {role} SET default_transaction_read_only = off");
    let (sessions, claims) = setup
        .around(async move {
            if let Err(error) = try_run(&admin, &read_only).await {
                return (vec![error], Vec::new());
            }
            let (pool, sessions) = opened_pool(&url, &role, FAILOVER_POOL_SIZE).await;
            let store = PostgresStore::builder(pool.clone())
                .table(table.as_str())
                .build()
                .expect("valid table name");
            let mut claims = Vec::new();
            // While every connection is read-only: one claim keeps its
            // connection's place in the store, failed.
            claims.push(claim(&store).await);
            if let Err(error) = try_run(&admin, &writable).await {
                pool.close().await;
                return (vec![error], claims);
            }
            // One claim per connection opened read-only, and one more.
            for _ in 0..=FAILOVER_POOL_SIZE {
                claims.push(claim(&store).await);
            }
            pool.close().await;
            (sessions, claims)
        })
        .await;
    assert_eq!(
        sessions,
        vec!["on"; FAILOVER_POOL_SIZE as usize],
        "every connection of the pool began read-only"
    );
    let (failed, after) = claims.split_first().expect("a claim while read-only");
    let failed = failed
        .as_ref()
        .expect_err("the role's sessions take no writes");
    assert!(matches!(failed, StoreError::Backend(_)), "{failed:?}");
    assert_says(&failed.to_string(), &["read-only transaction", "failover"]);
    let acquired = after
        .iter()
        .position(|claimed| matches!(claimed, Ok(Claim::Acquired(_))));
    assert!(
        acquired.is_some(),
        "a claim on a connection opened after the flip acquires the key; claims after it: {after:?}"
    );
    for claimed in &after[..acquired.unwrap_or(after.len())] {
        let error = claimed.as_ref().expect_err("only read-only sessions fail");
        assert_says(&error.to_string(), &["read-only transaction"]);
    }
}

/// A role that may no longer log in (`NOLOGIN`, as when a role is retired
/// under a running service): once its connections are gone, requests say
/// that the server refuses the store's role, as a setup to change.
#[tokio::test]
async fn a_role_refused_login_under_a_running_store_is_named() {
    let Some(url) = backend_url(URL) else { return };
    let privileges = ROW_PRIVILEGES;
    let setup = Setup::new(&url, Table::Migrated { privileges }).await;
    let store = setup.store(ManualClock::starting_now());
    store.migrate().await.expect("migrate as the role");
    let role = setup.role.clone();
    let admin = setup.admin.clone();
    let claimed = setup
        .around(async move {
            let retire = format!(
                "ALTER ROLE {role} NOLOGIN;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
            );
            run(&admin, &retire).await;
            let claimed = claim(&store).await;
            run(&admin, &format!("ALTER ROLE {role} LOGIN")).await;
            claimed
        })
        .await;
    let claimed = claimed.expect_err("the role may not log in");
    assert!(
        matches!(claimed, StoreError::Misconfigured(_)),
        "{claimed:?}"
    );
    assert_says(
        &claimed.to_string(),
        &["not permitted to log in", "refused the store's role"],
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
