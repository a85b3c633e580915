//! A durable store set up wrongly: the error at connect, migrate or
//! request time names what is wrong and what to change. PostgreSQL and
//! Redis tests need the test servers (`IDEMPOTENT_TEST_POSTGRES_URL`,
//! `IDEMPOTENT_TEST_REDIS_URL`); SQLite ones use temporary files.

mod store_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::RecordKey;
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, RedisStore, SqliteStore, Store};
use sqlx::postgres::PgConnectOptions;
use store_support::{OwnRedis, backend_url, unique_name};

const POSTGRES: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
const REDIS: &str = "IDEMPOTENT_TEST_REDIS_URL";

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("valid key"),
    )
}

/// The error of one claim, which `store` must refuse.
async fn claim_error(store: &impl Store) -> String {
    let claimed = store
        .claim(
            &record_key("k"),
            Fingerprint::from_bytes([1; 32]),
            Duration::from_secs(60),
        )
        .await;
    claimed.expect_err("the claim is refused").to_string()
}

fn assert_says(error: &str, words: &[&str]) {
    for word in words {
        assert!(error.contains(word), "`{word}` missing from: {error}");
    }
}

// ===== PostgreSQL =====

/// A connected store on `table` of the test database, and the URL.
async fn postgres_on(table: &str) -> Option<(PostgresStore, String)> {
    let url = backend_url(POSTGRES)?;
    let connected = PostgresStore::connect(&url).await.expect("connect");
    let store = PostgresStore::builder(connected.pool().clone())
        .table(table)
        .build()
        .expect("valid table name");
    Some((store, url))
}

async fn postgres_run(store: &PostgresStore, statement: &str) {
    sqlx::raw_sql(statement)
        .execute(store.pool())
        .await
        .expect("run the statement");
}

/// A URL that does not parse, or is another store's, says what URL to
/// give; sqlx read `http://` or `redis://` as PostgreSQL's and connected
/// to whatever listened there. Needs no server.
#[tokio::test]
async fn a_postgres_url_that_is_malformed_or_not_postgres_says_what_to_give() {
    for url in ["postgres//db", "http://127.0.0.1:1/test"] {
        let error = PostgresStore::connect(url)
            .await
            .expect_err(url)
            .to_string();
        assert_says(&error, &["postgres://user:password@host:5432/database"]);
    }
    let error = PostgresStore::connect("redis://127.0.0.1:1/0")
        .await
        .expect_err("not a PostgreSQL URL")
        .to_string();
    assert_says(&error, &["`redis://` is not a PostgreSQL URL"]);
}

/// A missing database or role is told with the server it was asked of
/// and what to do.
#[tokio::test]
async fn a_missing_postgres_database_or_role_says_where_and_what_to_do() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let database = unique_name("no_such_db");
    let error = PostgresStore::connect_with(options.clone().database(&database))
        .await
        .expect_err("no such database")
        .to_string();
    assert_says(&error, &[&server, &database, "create the database"]);
    let role = unique_name("no_such_role");
    let error = PostgresStore::connect_with(options.username(&role))
        .await
        .expect_err("no such role")
        .to_string();
    assert_says(&error, &[&server, &role, "create the role"]);
}

/// A table of the store's name made by something else was kept by
/// `CREATE TABLE IF NOT EXISTS`, and `migrate` succeeded: every request
/// then failed on "operator does not exist". It is refused by `migrate`,
/// and requests name the cause.
#[tokio::test]
async fn a_postgres_table_made_by_something_else_is_refused_by_migrate() {
    let table = unique_name("idem_foreign");
    let Some((store, _)) = postgres_on(&table).await else {
        return;
    };
    let create = format!("CREATE TABLE {table} (id text PRIMARY KEY, expires_at timestamptz)");
    postgres_run(&store, &create).await;
    let migrated = store.migrate().await.map_err(|error| error.to_string());
    let claimed = claim_error(&store).await;
    postgres_run(&store, &format!("DROP TABLE {table}")).await;
    assert_says(
        &migrated.expect_err("not the store's table"),
        &[
            &table,
            "not created by this store",
            "no column `scope`",
            "`expires_at` is timestamp with time zone, not bigint",
            "PostgresStoreBuilder::table",
        ],
    );
    assert_says(&claimed, &["PostgresStoreBuilder::table"]);
}

/// A table in a schema that does not exist: `migrate` says to create it.
#[tokio::test]
async fn migrating_into_a_missing_postgres_schema_says_to_create_it() {
    let table = format!("{}.records", unique_name("no_such_schema"));
    let Some((store, _)) = postgres_on(&table).await else {
        return;
    };
    let error = store
        .migrate()
        .await
        .expect_err("no such schema")
        .to_string();
    assert_says(&error, &[&table, "CREATE SCHEMA"]);
}

/// Purging before `migrate` ran names it, as requests do.
#[tokio::test]
async fn purging_a_missing_postgres_table_names_migrate() {
    let Some((store, _)) = postgres_on(&unique_name("idem_never_migrated")).await else {
        return;
    };
    let error = store
        .purge_expired()
        .await
        .expect_err("no table")
        .to_string();
    assert_says(&error, &["PostgresStore::migrate()"]);
}

/// A role without rights on the table is told what to grant, at
/// `migrate` and at request time. (A role without `CREATE` on the schema
/// and no table to find: `store_postgres_roles.rs`.)
#[tokio::test]
async fn a_postgres_role_without_privileges_is_told_what_to_grant() {
    let table = unique_name("idem_privileges");
    let Some((owner, url)) = postgres_on(&table).await else {
        return;
    };
    owner.migrate().await.expect("migrate as the owner");
    let role = unique_name("idem_role");
    postgres_run(&owner, &format!("CREATE ROLE {role} LOGIN")).await;
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let connected = PostgresStore::connect_with(options.username(&role))
        .await
        .map(|connected| connected.pool().clone());
    let (migrated, claimed) = match &connected {
        Ok(pool) => {
            let store = PostgresStore::builder(pool.clone())
                .table(table.as_str())
                .build()
                .expect("valid table name");
            let migrated = store.migrate().await.map_err(|error| error.to_string());
            (migrated, claim_error(&store).await)
        }
        Err(error) => (Err(error.to_string()), String::new()),
    };
    if let Ok(pool) = connected {
        pool.close().await;
    }
    postgres_run(&owner, &format!("DROP TABLE {table}; DROP ROLE {role}")).await;
    let migrate_error = migrated.expect_err("the role may not use the table");
    assert_says(
        &migrate_error,
        &[&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}"
        )],
    );
    assert_says(&claimed, &["grant SELECT, INSERT, UPDATE and DELETE"]);
}

// ===== Redis =====

/// A URL that does not parse says what URL to give. Needs no server.
#[tokio::test]
async fn a_malformed_redis_url_says_what_to_give() {
    for url in [
        "redis//host",
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:99999",
    ] {
        let error = RedisStore::connect(url).await.expect_err(url).to_string();
        assert_says(&error, &["redis://:password@host:6379/0"]);
    }
}

/// Nothing listening: the error names the server. Needs no server.
#[tokio::test]
async fn a_redis_that_is_not_there_is_named() {
    let port = OwnRedis::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let error = RedisStore::connect(&url)
        .await
        .expect_err("nothing listens");
    let error = error.to_string();
    assert_says(
        &error,
        &[&format!("Redis at 127.0.0.1:{port}"), "runs and listens"],
    );
}

/// A server that wants a password accepted the connection, and then every
/// request got 503 with "NOAUTH": `connect` fails and says to put the
/// password in the URL.
#[tokio::test]
async fn a_redis_that_wants_a_password_fails_at_connect() {
    if backend_url(REDIS).is_none() {
        return;
    }
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &["--requirepass", "secret"]).await;
    let connected = RedisStore::connect(&redis.url()).await;
    redis.stop().await;
    let error = connected.expect_err("no password given").to_string();
    assert_says(
        &error,
        &["requires a password", "redis://:password@host:port"],
    );
}

/// A database index past the server's count says so.
#[tokio::test]
async fn a_redis_database_out_of_range_says_so() {
    let Some(url) = backend_url(REDIS) else {
        return;
    };
    let url = format!("{}/99", url.trim_end_matches('/'));
    let error = RedisStore::connect(&url).await.expect_err("no database 99");
    assert_says(&error.to_string(), &["fewer databases", "`databases`"]);
}

/// A key under the store's prefix that holds a hash (another
/// application's): the claim names the key and says to change the prefix.
#[tokio::test]
async fn a_redis_key_of_another_type_names_the_key_and_the_prefix() {
    let Some(url) = backend_url(REDIS) else {
        return;
    };
    let store = RedisStore::builder(store_connection(&url).await)
        .prefix(unique_name("idem_test") + ":")
        .build();
    let redis_key = store.redis_key(&record_key("k"));
    let mut connection = store_connection(&url).await;
    let _: () = redis::cmd("HSET")
        .arg(&redis_key)
        .arg("field")
        .arg("value")
        .query_async(&mut connection)
        .await
        .expect("HSET");
    let error = claim_error(&store).await;
    let _: () = redis::cmd("DEL")
        .arg(&redis_key)
        .query_async(&mut connection)
        .await
        .expect("DEL");
    assert_says(&error, &[&redis_key, "RedisStoreBuilder::prefix"]);
}

async fn store_connection(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).expect("valid URL");
    redis::aio::ConnectionManager::new(client)
        .await
        .expect("connect to the test Redis")
}

// ===== SQLite =====

/// A directory of its own under the system temporary directory, removed
/// when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("idempotent-test-dir"));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn sqlite_open_error(path: &Path) -> String {
    let opened = SqliteStore::open(path).await;
    opened.expect_err("cannot be opened").to_string()
}

/// SQLite says only "unable to open database file": the error names the
/// path and why.
#[tokio::test]
async fn a_sqlite_path_that_cannot_be_opened_says_why() {
    let dir = TempDir::new();
    let missing = dir.path().join("missing");
    let error = sqlite_open_error(&missing.join("records.db")).await;
    let missing = missing.display().to_string();
    assert_says(&error, &[&missing, "does not exist", "create it"]);
    let error = sqlite_open_error(dir.path()).await;
    assert_says(
        &error,
        &[&dir.path().display().to_string(), "is a directory"],
    );
    let junk = dir.path().join("junk.db");
    let bytes: Vec<u8> = (0..4096_u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&junk, bytes).expect("write the file");
    let error = sqlite_open_error(&junk).await;
    let junk = junk.display().to_string();
    assert_says(&error, &[&junk, "is not a SQLite database"]);
}

/// A URL of another store was read as a file name (and the file
/// created): it is refused, saying what URL to give.
#[tokio::test]
async fn a_url_that_is_not_sqlite_is_refused() {
    let connected = SqliteStore::connect("postgres://127.0.0.1/records").await;
    let error = connected.expect_err("not a SQLite URL").to_string();
    assert_says(&error, &["not a SQLite URL", "sqlite://idempotency.db"]);
}

/// Before `migrate`, requests name it.
#[tokio::test]
async fn a_missing_sqlite_table_names_migrate() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.path().join("records.db"))
        .await
        .expect("open");
    assert_says(&claim_error(&store).await, &["SqliteStore::migrate()"]);
    let error = store.purge_expired().await.expect_err("no table");
    assert_says(&error.to_string(), &["SqliteStore::migrate()"]);
}

/// A table of the store's name made by something else: `migrate`, which
/// succeeded when the table had an `expires_at`, refuses it, and requests
/// name the cause.
#[tokio::test]
async fn a_sqlite_table_made_by_something_else_is_refused_by_migrate() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.path().join("records.db"))
        .await
        .expect("open");
    sqlx::raw_sql("CREATE TABLE idempotency_records (id INTEGER PRIMARY KEY, expires_at TEXT)")
        .execute(store.pool())
        .await
        .expect("create another table");
    let error = store.migrate().await.expect_err("not the store's table");
    assert_says(
        &error.to_string(),
        &[
            "idempotency_records",
            "not created by this store",
            "no column `scope`",
            "SqliteStoreBuilder::table",
        ],
    );
    assert_says(&claim_error(&store).await, &["SqliteStoreBuilder::table"]);
}

/// A table in a schema that is not attached: `migrate` says to attach it.
#[tokio::test]
async fn migrating_into_an_unattached_sqlite_schema_says_so() {
    let dir = TempDir::new();
    let opened = SqliteStore::open(dir.path().join("records.db"))
        .await
        .expect("open");
    let store = SqliteStore::builder(opened.pool().clone())
        .table("archive.records")
        .build()
        .expect("valid table name");
    let error = store.migrate().await.expect_err("no such schema");
    assert_says(&error.to_string(), &["archive.records", "not attached"]);
}

/// A database opened read-only takes no claim, and says so.
#[tokio::test]
async fn a_read_only_sqlite_database_says_so() {
    let dir = TempDir::new();
    let file = dir.path().join("records.db");
    let writable = SqliteStore::open(&file).await.expect("open");
    writable.migrate().await.expect("migrate");
    writable.pool().close().await;
    let url = format!("sqlite://{}?mode=ro", file.display());
    let store = SqliteStore::connect(&url).await.expect("open read-only");
    let error = claim_error(&store).await;
    assert_says(&error, &["read-only", "open it read-write"]);
}
