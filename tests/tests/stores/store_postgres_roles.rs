//! `PostgresStore` connected as a role that may only read and write the
//! table's rows, the table made beforehand by a role that may create it
//! (`IDEMPOTENT_TEST_POSTGRES_URL`, as a superuser). Each test makes a
//! role and a table of its own, and drops both.

use crate::store_support;

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use idempotent_core::clock::ManualClock;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, Store, StoreError};
use idempotent_core::testing::contract;
use sqlx::ConnectOptions;
use sqlx::Connection as _;
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
    /// None, named without a schema; the role's `search_path` names a
    /// schema of its own, which it may use but not create in.
    MissingOnItsSearchPath,
    /// Made with `PostgresStore::migration_sql` under a name of 63
    /// characters, the longest PostgreSQL keeps, the role granted every
    /// row privilege.
    LongNamed,
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
        let on_search_path = matches!(table, Table::MissingOnItsSearchPath);
        let schema = match reserved {
            true => Some("order".to_owned()),
            false => (in_schema || on_search_path).then(|| format!("{name}_schema")),
        };
        let base = if reserved { "order" } else { "records" };
        let table_name = match &schema {
            Some(schema) if in_schema => format!("{schema}.{base}"),
            _ if matches!(table, Table::LongNamed) => format!("{name:_<63}"),
            _ => name.clone(),
        };
        run(&admin, &format!("CREATE ROLE {role} LOGIN")).await;
        let migration = PostgresStore::migration_sql(&table_name).expect("valid table name");
        match table {
            Table::Missing => {}
            Table::MissingOnItsSearchPath => {
                let schema = schema.as_deref().expect("a schema");
                let setup = format!(
                    "CREATE SCHEMA {schema}; GRANT USAGE ON SCHEMA {schema} TO \"{role}\";
                     ALTER ROLE \"{role}\" SET search_path = {schema}"
                );
                run(&admin, &setup).await;
            }
            Table::LongNamed => {
                run(&admin, &migration).await;
                let grant = format!("GRANT {ROW_PRIVILEGES} ON {table_name} TO \"{role}\"");
                run(&admin, &grant).await;
            }
            Table::Migrated { privileges } => {
                run(&admin, &migration).await;
                run(
                    &admin,
                    &format!("GRANT {privileges} ON {table_name} TO \"{role}\""),
                )
                .await;
            }
            Table::WithoutIndex => {
                let create_table = &migration[..migration.find("CREATE INDEX").expect("an index")];
                run(&admin, create_table).await;
                let grant = format!("GRANT {ROW_PRIVILEGES} ON {table_name} TO \"{role}\"");
                run(&admin, &grant).await;
            }
            Table::InSchemaWithoutUsage => {
                let schema = schema.as_deref().expect("a schema");
                run(&admin, &format!("CREATE SCHEMA {schema}")).await;
                run(&admin, &migration).await;
                let grant = format!("GRANT {ROW_PRIVILEGES} ON {table_name} TO \"{role}\"");
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

/// A pool connected as the test server's superuser, who makes and drops
/// the roles and tables of these tests.
async fn superuser(url: &str) -> PgPool {
    PgPool::connect(url)
        .await
        .expect("connect as the superuser")
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

/// A role whose `search_path` names a schema of the application's own,
/// where it may not create the table, was told to grant `CREATE` on
/// `public`, where `CREATE TABLE` does not put the table: after that
/// `GRANT`, `migrate` failed as before. It names the schema the table
/// goes to, and the `GRANT` it suggests lets the role migrate.
#[tokio::test]
async fn a_role_whose_search_path_names_its_own_schema_is_told_to_grant_create_there() {
    let Some(url) = backend_url(URL) else { return };
    let setup = Setup::new(&url, Table::MissingOnItsSearchPath).await;
    let store = setup.store(ManualClock::starting_now());
    let (role, admin) = (setup.role.clone(), setup.admin.clone());
    let (refused, migrated) = setup
        .around(async move {
            let refused = store.migrate().await.map_err(|error| error.to_string());
            let Err(refused) = refused else {
                return (String::new(), Err("the role created the table".to_owned()));
            };
            let grant = suggested_sql(&refused).replace("...", &format!("\"{role}\""));
            let migrated = match try_run(&admin, &grant).await {
                Ok(()) => store.migrate().await.map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            (refused, migrated)
        })
        .await;
    assert_says(&refused, &["GRANT CREATE ON SCHEMA"]);
    migrated.unwrap_or_else(|error| panic!("after the GRANT that `{refused}` suggests: {error}"));
}

/// A role refused `CONNECT` on the database, given to the store as a pool
/// that connects when first used: `migrate` said that the role may not
/// create the table, and to grant it `CREATE` on the schema, which does
/// not let it connect. It says to grant `CONNECT`, as
/// `PostgresStore::connect` does, and that `GRANT` lets the role connect.
#[tokio::test]
async fn a_role_refused_connect_is_told_by_migrate_to_grant_connect() {
    let Some(url) = backend_url(URL) else { return };
    let cluster = superuser(&url).await;
    let name = unique_name("idem_connect");
    let (database, role) = (format!("{name}_db"), format!("{name}_role"));
    run(&cluster, &format!("CREATE ROLE {role} LOGIN")).await;
    run(&cluster, &format!("CREATE DATABASE {database}")).await;
    let revoke = format!("REVOKE CONNECT ON DATABASE {database} FROM PUBLIC");
    run(&cluster, &revoke).await;
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let pool = PostgresStore::pool_options()
        .connect_lazy_with(options.database(&database).username(&role));
    let store = PostgresStore::builder(pool.clone())
        .build()
        .expect("valid table name");
    let refused = store.migrate().await.map_err(|error| error.to_string());
    let granted = match &refused {
        Err(refused) => try_run(&cluster, suggested_sql(refused)).await,
        Ok(()) => Err("migrated without CONNECT".to_owned()),
    };
    let connected = pool.acquire().await.map(drop);
    pool.close().await;
    run(&cluster, &format!("DROP DATABASE {database} WITH (FORCE)")).await;
    run(&cluster, &format!("DROP ROLE {role}")).await;
    let refused = refused.expect_err("the role may not connect");
    assert_says(&refused, &["GRANT CONNECT ON DATABASE"]);
    granted.unwrap_or_else(|error| panic!("the GRANT `{refused}` suggests: {error}"));
    connected.expect("the role connects after the GRANT");
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
            &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON \"{table}\" TO \"{role}\""),
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
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO \"{role}\"")
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
    let cluster = superuser(&url).await;
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
            format!("GRANT USAGE ON SCHEMA \"{schema}\" TO \"{role}\""),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON \"{schema}\".\"order\" TO \"{role}\""),
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
        format!("ALTER ROLE \"{role}\" SET default_transaction_read_only = off")
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

/// How many connections the failover tests' pools open: all of them
/// read-only before the role's setting flips. The store keeps one (half
/// the pool); the other waits idle in the pool.
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

/// A store on `table` as `role` that lived through a failover: every
/// connection of its pool was opened to "the old primary" (opened as the
/// role while its transactions were read-only), one of them kept by the
/// store after a read, the other idle in the pool; then the role's new
/// connections were made writable (connections opened now reach "the new
/// primary"). Hands back the store, its pool, and whether each connection
/// began read-only; or what failed.
async fn store_after_a_failover(
    url: &str,
    admin: &PgPool,
    role: &str,
    table: &str,
) -> Result<(PostgresStore, PgPool, Vec<String>), String> {
    try_run(
        admin,
        &format!("ALTER ROLE {role} SET default_transaction_read_only = on"),
    )
    .await?;
    let (pool, began_read_only) = opened_pool(url, role, FAILOVER_POOL_SIZE).await;
    let store = PostgresStore::builder(pool.clone())
        .table(table)
        .build()
        .expect("valid table name");
    // A read runs on a read-only connection: the store keeps it.
    let read = store.get(&record_key("k")).await;
    let flipped = try_run(
        admin,
        &format!("ALTER ROLE \"{role}\" SET default_transaction_read_only = off"),
    )
    .await;
    if let Err(error) = read.map_err(|error| error.to_string()).and(flipped) {
        pool.close().await;
        return Err(error);
    }
    Ok((store, pool, began_read_only))
}

/// After a failover the old primary comes back as a hot standby (or is
/// fenced read-only), and a connection the store opened to it answers
/// every write with "cannot execute INSERT in a read-only transaction"
/// (SQLSTATE 25006). The store closed it, but the claim that met it
/// failed with a 503, and so did one claim for each other connection
/// opened before the failover, kept or idle in the pool. The server
/// applied nothing of a statement it refused so: the claim now runs once
/// more, after the connections idle beside it were closed too, on a new
/// connection, and acquires the key, with its own token.
#[tokio::test]
async fn a_claim_that_meets_a_server_turned_read_only_is_acquired_on_a_new_connection() {
    let Some(url) = backend_url(URL) else { return };
    let privileges = ROW_PRIVILEGES;
    let setup = Setup::new(&url, Table::Migrated { privileges }).await;
    let (role, table, admin) = (setup.role.clone(), setup.table.clone(), setup.admin.clone());
    let outcome = setup
        .around(async move {
            let (store, pool, began_read_only) =
                store_after_a_failover(&url, &admin, &role, &table).await?;
            let claimed = claim(&store).await;
            let record = store.get(&record_key("k")).await;
            pool.close().await;
            Ok::<_, String>((began_read_only, claimed, record))
        })
        .await;
    let (began_read_only, claimed, record) = outcome.expect("set up the failover");
    assert_eq!(
        began_read_only,
        vec!["on"; FAILOVER_POOL_SIZE as usize],
        "every connection of the pool began read-only"
    );
    let Ok(Claim::Acquired(token)) = claimed else {
        panic!("the first claim after the failover acquires the key: {claimed:?}");
    };
    match record.expect("read the record") {
        Some(Record::InFlight(in_flight)) => assert_eq!(in_flight.lease_token, token),
        other => panic!("the claim's own lease holds the key: {other:?}"),
    }
}

/// A completion that meets a connection opened before a failover, to the
/// old primary now read-only, failed: the response was not stored, and
/// once the lease lapsed a retry ran the handler again. The completion is
/// fenced by its token and clears it, so that run twice, the second finds
/// no token and says the lease was lost; but a statement refused
/// read-only was not applied, so that the second run is the only one. It
/// stores the response.
#[tokio::test]
async fn a_completion_that_meets_a_server_turned_read_only_is_stored_on_a_new_connection() {
    let Some(url) = backend_url(URL) else { return };
    let privileges = ROW_PRIVILEGES;
    let setup = Setup::new(&url, Table::Migrated { privileges }).await;
    let (role, table, admin) = (setup.role.clone(), setup.table.clone(), setup.admin.clone());
    let claimer = setup.store(ManualClock::starting_now());
    let outcome = setup
        .around(async move {
            let (store, pool, _) = store_after_a_failover(&url, &admin, &role, &table).await?;
            // Claimed on "the new primary", by an instance that reached it.
            let claimed = claim(&claimer).await;
            let Ok(Claim::Acquired(token)) = claimed else {
                pool.close().await;
                return Err(format!("claim on a writable connection: {claimed:?}"));
            };
            let response = StoredResponse::new(
                StatusCode::CREATED,
                Vec::new(),
                Some(Bytes::from_static(b"paid")),
            );
            let lease = Duration::from_secs(60);
            let completed = store
                .complete(&record_key("k"), token, response, lease)
                .await;
            let record = store.get(&record_key("k")).await;
            pool.close().await;
            Ok((completed, record))
        })
        .await;
    let (completed, record) = outcome.expect("set up the failover");
    completed.expect("the completion is stored on a new connection");
    match record.expect("read the record") {
        Some(Record::Completed(completed)) => {
            assert_eq!(completed.response.status, StatusCode::CREATED);
            assert_eq!(completed.response.body.as_deref(), Some(&b"paid"[..]));
        }
        other => panic!("the record is completed: {other:?}"),
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

/// A service whose role may only read and write rows, started beside
/// the migration job that makes its table (as a role that may): the
/// service's `migrate` found no table, waited for the job's migration to
/// finish, then ran `CREATE TABLE IF NOT EXISTS`, which PostgreSQL
/// refuses such a role whether the table exists or not; it failed, told
/// to grant `CREATE` on the schema, beside a table ready for it. It
/// looks at the table again, and accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_only_read_and_write_rows_migrates_beside_the_job_making_its_table() {
    let Some(url) = backend_url(URL) else { return };
    let admin = superuser(&url).await;
    let table = unique_name("idem_made_meanwhile");
    let role = format!("{table}_role");
    run(&admin, &format!("CREATE ROLE {role} LOGIN")).await;
    let pool = role_pool(&url, &role).await;
    let store = PostgresStore::builder(pool.clone())
        .table(table.as_str())
        .build()
        .expect("valid table name");
    let migrated = migrate_while_the_job_makes(&url, &store, &role).await;
    pool.close().await;
    run(
        &admin,
        &format!("DROP TABLE IF EXISTS {table}; DROP ROLE {role}"),
    )
    .await;
    admin.close().await;
    migrated.expect("the table the job made is the store's");
}

/// `store`'s `migrate` as `role`, while a migration job as the superuser
/// of `url` holds the lock that migrations of the table take, and makes
/// the table, granting `role` its rows, once `migrate` waits for it.
async fn migrate_while_the_job_makes(
    url: &str,
    store: &PostgresStore,
    role: &str,
) -> Result<(), StoreError> {
    let mut job = sqlx::PgConnection::connect(url)
        .await
        .expect("connect as the superuser");
    let table = store.table();
    let lock = format!("hashtext('idempotent:{table}')");
    run_on(&mut job, &format!("SELECT pg_advisory_lock({lock})")).await;
    let migrating = store.migrate();
    let job_done = async {
        until_waiting_for_a_lock(&mut job, role).await;
        let migration = PostgresStore::migration_sql(table).expect("valid table name");
        run_on(&mut job, &migration).await;
        run_on(
            &mut job,
            &format!("GRANT {ROW_PRIVILEGES} ON {table} TO {role}"),
        )
        .await;
        run_on(&mut job, &format!("SELECT pg_advisory_unlock({lock})")).await;
    };
    let (migrated, ()) = tokio::join!(migrating, job_done);
    drop(job.close().await);
    migrated
}

async fn run_on(connection: &mut sqlx::PgConnection, statements: &str) {
    (sqlx::raw_sql(statements).execute(&mut *connection))
        .await
        .unwrap_or_else(|error| panic!("run `{statements}`: {error}"));
}

/// Waits until a connection as `role` waits for a lock.
async fn until_waiting_for_a_lock(connection: &mut sqlx::PgConnection, role: &str) {
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE usename = $1 AND wait_event_type = 'Lock'";
    for _ in 0..500 {
        let count: i64 = (sqlx::query_scalar(waiting).bind(role))
            .fetch_one(&mut *connection)
            .await
            .expect("read pg_stat_activity");
        if count > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("`migrate` never waited for the migration lock");
}

/// How many connections a role may hold at once in the test of a pool
/// filled up to that limit, and how many its pool opens.
const CONNECTION_LIMIT: u32 = 2;

/// A pool as big as its role's `CONNECTION LIMIT` (or as the share of
/// `max_connections` left to each of a service's instances), every
/// connection busy: a claim waits for one to come back, as it would from
/// any pool that may open no more. The store took the wait for a server
/// that takes no connections, connected once to learn why, was refused
/// ("too many connections for role"), and failed the claim at once
/// (503), logging that PostgreSQL took no connections, while one of the
/// pool's own came back a moment later. It serves the claim then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waiting_for_a_full_pool_at_the_roles_connection_limit_is_served() {
    let Some(url) = backend_url(URL) else { return };
    let admin = superuser(&url).await;
    let table = unique_name("idem_limited");
    let role = format!("{table}_role");
    let migration = PostgresStore::migration_sql(&table).expect("valid table name");
    let setup = format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT {CONNECTION_LIMIT}; {migration};
         GRANT {ROW_PRIVILEGES} ON {table} TO {role}"
    );
    run(&admin, &setup).await;
    let claimed = claim_while_every_connection_is_busy(&url, &role, &table).await;
    run(&admin, &format!("DROP TABLE {table}; DROP ROLE {role}")).await;
    admin.close().await;
    let claimed = claimed.expect("the claim waits for a connection of the pool");
    assert!(matches!(claimed, Claim::Acquired(_)), "{claimed:?}");
}

/// A claim on `table` as `role`, through a pool of [`CONNECTION_LIMIT`]
/// connections each held elsewhere until well after the store would
/// have checked whether the server takes connections.
async fn claim_while_every_connection_is_busy(
    url: &str,
    role: &str,
    table: &str,
) -> Result<Claim, StoreError> {
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let pool = PostgresStore::pool_options()
        .max_connections(CONNECTION_LIMIT)
        .connect_with(options.username(role))
        .await
        .expect("connect as the role");
    // Kept none: each statement takes a connection from the pool.
    let store = PostgresStore::builder(pool.clone())
        .table(table)
        .hold_connections(0)
        .build()
        .expect("valid table name");
    let mut busy = Vec::new();
    for _ in 0..CONNECTION_LIMIT {
        busy.push(pool.acquire().await.expect("open a connection"));
    }
    let claiming = tokio::spawn(async move { claim(&store).await });
    // The store checks the server after 100 ms of waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(busy);
    let claimed = claiming.await.expect("the claim did not panic");
    pool.close().await;
    claimed
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

/// Whether `table` has an index on `expires_at`, as `pool` reads the
/// catalog.
async fn has_expires_at_index(pool: &PgPool, table: &str) -> bool {
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = $1")
            .bind(table)
            .fetch_all(pool)
            .await
            .expect("read the indexes");
    indexes.iter().any(|index| index.ends_with("(expires_at)"))
}

/// A table named with 63 characters, the longest name PostgreSQL keeps:
/// the name of its index, the table's with `_expires_at_idx` after it,
/// was cut back by PostgreSQL to the table's own, so that `CREATE INDEX
/// IF NOT EXISTS` found the table under it and created nothing. The
/// table had no index, every purge read all of it, and `migrate`, run as
/// the role, failed at every start, saying to run as the owner the
/// `CREATE INDEX` that had just created nothing. The table gets its
/// index, and the role migrates.
#[tokio::test]
async fn a_table_named_with_63_characters_gets_its_index_and_the_role_migrates() {
    let Some(url) = backend_url(URL) else { return };
    let setup = Setup::new(&url, Table::LongNamed).await;
    let store = setup.store(ManualClock::starting_now());
    let (admin, table) = (setup.admin.clone(), setup.table.clone());
    assert_eq!(table.len(), 63, "{table}");
    let (migrated, indexed) = setup
        .around(async move {
            let migrated = store.migrate().await.map_err(|error| error.to_string());
            (migrated, has_expires_at_index(&admin, &table).await)
        })
        .await;
    assert!(indexed, "the migration SQL made no index");
    migrated.expect("the role migrates the table with its index");
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

/// `name` written as SQL text, always quoted: the tests' own statements
/// need no judgment of which names may stand bare.
fn quoted_name(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL the store suggested named its role bare when the name was
/// made of lowercase letters, digits and underscores, so that for a role
/// named with a reserved word (`user`) the `GRANT ... TO user` was a
/// syntax error. Each role here takes every suggestion the store makes,
/// as an operator would paste it: `GRANT USAGE ON SCHEMA`, `GRANT ... ON`
/// the table, `ALTER ROLE ... SET default_transaction_read_only = off`
/// and `GRANT CONNECT ON DATABASE` (a database named with capitals and a
/// dash); each runs, and is all the role lacked.
#[tokio::test]
async fn the_sql_suggested_for_roles_postgresql_reads_otherwise_unquoted_runs() {
    let Some(url) = backend_url(URL) else { return };
    let unique = unique_name("");
    for role in [
        "user".to_owned(),
        format!("Mixed{unique}"),
        format!("svc-payments{unique}"),
    ] {
        let cluster = superuser(&url).await;
        run(
            &cluster,
            &format!("CREATE ROLE {} LOGIN", quoted_name(&role)),
        )
        .await;
        let followed = follow_every_suggestion(&url, &cluster, &role).await;
        let cleanup = format!(
            "DROP OWNED BY {role}; DROP ROLE {role};",
            role = quoted_name(&role)
        );
        run(&cluster, &cleanup).await;
        cluster.close().await;
        let suggested = followed.unwrap_or_else(|error| panic!("role `{role}`: {error}"));
        let role_sql = quoted_name(&role);
        assert_eq!(suggested.len(), 4, "role `{role}`: {suggested:?}");
        for sql in &suggested {
            assert!(sql.contains(&role_sql), "role `{role}` quoted: {sql}");
        }
    }
}

/// Makes `role`'s every problem the store names, in a database and a
/// schema of its own, and runs each fix the store suggests as the
/// superuser; hands back the suggested SQL, or what failed.
async fn follow_every_suggestion(
    url: &str,
    cluster: &PgPool,
    role: &str,
) -> Result<Vec<String>, String> {
    let database = format!("Db-{}", unique_name("role"));
    let database_sql = quoted_name(&database);
    try_run(cluster, &format!("CREATE DATABASE {database_sql}")).await?;
    let revoked = format!("REVOKE CONNECT ON DATABASE {database_sql} FROM PUBLIC");
    let mut suggested = Vec::new();
    let followed = match try_run(cluster, &revoked).await {
        Ok(()) => follow_in(url, &database, role, &mut suggested).await,
        Err(error) => Err(error),
    };
    let dropped = format!("DROP DATABASE {database_sql} WITH (FORCE)");
    try_run(cluster, &dropped).await?;
    followed.map(|()| suggested)
}

/// [`follow_every_suggestion`] in `database`, pushing each suggestion to
/// `suggested`.
async fn follow_in(
    url: &str,
    database: &str,
    role: &str,
    suggested: &mut Vec<String>,
) -> Result<(), String> {
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let options = options.database(database);
    let as_role = options.clone().username(role);
    let fixed = |fix: String, suggested: &mut Vec<String>| {
        suggested.push(fix.clone());
        let options = options.clone();
        async move {
            let admin = PgPool::connect_with(options)
                .await
                .map_err(|error| error.to_string())?;
            let ran = try_run(&admin, &fix).await;
            admin.close().await;
            ran
        }
    };
    // CONNECT revoked from PUBLIC.
    let Err(refused) = PostgresStore::connect_with(as_role.clone()).await else {
        return Err("the role connected without CONNECT".to_owned());
    };
    fixed(suggested_sql(&refused.to_string()).to_owned(), suggested).await?;
    let store = PostgresStore::connect_with(as_role.clone())
        .await
        .map_err(|error| format!("connect after the GRANT: {error}"))?;
    // A table in a schema of its own, neither granted to the role.
    let table = "app.records";
    let admin = PgPool::connect_with(options.clone())
        .await
        .map_err(|error| error.to_string())?;
    let migration = PostgresStore::migration_sql(table).expect("valid table name");
    let made = try_run(&admin, &format!("CREATE SCHEMA app; {migration}")).await;
    admin.close().await;
    made?;
    let store = PostgresStore::builder(store.pool().clone())
        .table(table)
        .build()
        .expect("valid table name");
    for _ in 0..2 {
        let refused = store.migrate().await.expect_err("the role lacks a GRANT");
        fixed(suggested_sql(&refused.to_string()).to_owned(), suggested).await?;
    }
    store.migrate().await.map_err(|error| error.to_string())?;
    store.pool().close().await;
    // Read-only transactions for the role.
    let read_only = format!(
        "ALTER ROLE {} SET default_transaction_read_only = on",
        quoted_name(role)
    );
    fixed(read_only, &mut Vec::new()).await?;
    let store = PostgresStore::builder(
        PostgresStore::pool_options()
            .connect_with(as_role.clone())
            .await
            .map_err(|error| error.to_string())?,
    )
    .table(table)
    .build()
    .expect("valid table name");
    let refused = store
        .migrate()
        .await
        .expect_err("the role's transactions are read-only");
    store.pool().close().await;
    fixed(suggested_sql(&refused.to_string()).to_owned(), suggested).await?;
    let store = PostgresStore::connect_with(as_role)
        .await
        .map_err(|error| error.to_string())?;
    let store = PostgresStore::builder(store.pool().clone())
        .table(table)
        .build()
        .expect("valid table name");
    let migrated = store.migrate().await.map_err(|error| error.to_string());
    store.pool().close().await;
    migrated
}
