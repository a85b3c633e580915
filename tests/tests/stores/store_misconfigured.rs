//! A durable store set up wrongly: the error at connect, migrate or
//! request time names what is wrong and what to change, and is a
//! `StoreError::Misconfigured`, which retrying does not cure, unlike an
//! outage (`StoreError::Backend`). PostgreSQL and Redis tests need the
//! test servers (`IDEMPOTENT_TEST_POSTGRES_URL`,
//! `IDEMPOTENT_TEST_REDIS_URL`); SQLite ones use temporary files.

use crate::store_support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, RedisStore, SqliteStore, Store, StoreError};
use sqlx::Connection as _;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnection;
use store_support::{
    OwnRedis, backend_url, delete, hash_at, redis_connection, suggested_sql, unique_name,
};

const POSTGRES: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
const REDIS: &str = "IDEMPOTENT_TEST_REDIS_URL";

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("valid key"),
    )
}

/// One claim of a new key.
async fn claim(store: &impl Store) -> Result<Claim, StoreError> {
    let key = record_key("k");
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await
}

/// The error of one claim, which `store` must refuse.
async fn claim_refusal(store: &impl Store) -> StoreError {
    claim(store).await.expect_err("the claim is refused")
}

/// The text of one claim's error, which must be a setup to change.
async fn claim_error(store: &impl Store) -> String {
    let error = claim_refusal(store).await;
    assert_misconfigured(&error);
    error.to_string()
}

/// `error` is a setup to change, not an outage that may pass.
fn assert_misconfigured(error: &StoreError) {
    assert!(
        matches!(error, StoreError::Misconfigured(_)),
        "not told as a setup to change: {error:?}"
    );
}

/// `error` is an outage that may pass, not a setup to change.
fn assert_outage(error: &StoreError) {
    assert!(
        matches!(error, StoreError::Backend(_)),
        "not told as an outage: {error:?}"
    );
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

/// A store on `table` of the test database whose connections run with
/// the server's setting `name` at `value`, as a role's or a database's
/// setting would have them, without changing either.
async fn postgres_with_setting(table: &str, name: &str, value: &str) -> Option<PostgresStore> {
    let url = backend_url(POSTGRES)?;
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let pool = PostgresStore::pool_options()
        .max_connections(2)
        .connect_with(options.options([(name, value)]))
        .await
        .expect("connect");
    let store = PostgresStore::builder(pool)
        .table(table)
        .build()
        .expect("valid table name");
    Some(store)
}

/// Runs `statement` on `pool`, which must take it.
async fn postgres_run(pool: &sqlx::PgPool, statement: &str) {
    sqlx::raw_sql(statement)
        .execute(pool)
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
}

/// A URL that does not parse, or is another store's, says what URL to
/// give; sqlx read `http://` or `redis://` as PostgreSQL's and connected
/// to whatever listened there. Needs no server.
#[tokio::test]
async fn a_postgres_url_that_is_malformed_or_not_postgres_says_what_to_give() {
    for url in ["postgres//db", "http://127.0.0.1:1/test"] {
        let error = PostgresStore::connect(url).await.expect_err(url);
        assert_misconfigured(&error);
        assert_says(
            &error.to_string(),
            &["postgres://user:password@host:5432/database"],
        );
    }
    let error = PostgresStore::connect("redis://127.0.0.1:1/0")
        .await
        .expect_err("not a PostgreSQL URL");
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &["`redis://` is not a PostgreSQL URL"]);
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
        .expect_err("no such database");
    assert_misconfigured(&error);
    assert_says(
        &error.to_string(),
        &[&server, &database, "create the database"],
    );
    let role = unique_name("no_such_role");
    let error = PostgresStore::connect_with(options.username(&role))
        .await
        .expect_err("no such role");
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &[&server, &role, "create the role"]);
}

/// A role that may not connect to the database (`CONNECT` revoked from
/// `PUBLIC`, and not granted to it) was told to "check the URL and the
/// server", as an outage: it is told the `GRANT CONNECT` to run.
#[tokio::test]
async fn a_postgres_role_without_connect_on_the_database_is_told_what_to_grant() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    // A name with a hyphen, as databases often have, which a `GRANT`
    // must quote.
    let role = unique_name("idem_no_connect");
    let database = format!("{role}-db");
    for statement in [
        format!("CREATE DATABASE \"{database}\""),
        format!("REVOKE CONNECT ON DATABASE \"{database}\" FROM PUBLIC"),
        format!("CREATE ROLE {role} LOGIN"),
    ] {
        postgres_run(&admin, &statement).await;
    }
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let options = options.username(&role).database(&database);
    let refused = PostgresStore::connect_with(options.clone()).await.map(drop);
    let told = match &refused {
        Err(error) => suggested_sql(&error.to_string()).to_owned(),
        Ok(()) => String::new(),
    };
    let granted = sqlx::raw_sql(&told).execute(&admin).await.map(drop);
    let connected_after_grant = PostgresStore::connect_with(options)
        .await
        .map(|store| store.pool().clone());
    if let Ok(pool) = &connected_after_grant {
        pool.close().await;
    }
    for statement in [
        format!("DROP DATABASE \"{database}\""),
        format!("DROP ROLE {role}"),
    ] {
        postgres_run(&admin, &statement).await;
    }
    let error = refused.expect_err("the role may not connect");
    assert_misconfigured(&error);
    assert_eq!(
        told,
        format!("GRANT CONNECT ON DATABASE \"{database}\" TO \"{role}\"")
    );
    granted.expect("the GRANT told runs");
    connected_after_grant.expect("the GRANT told lets the role connect");
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
    postgres_run(store.pool(), &create).await;
    let migrated = store.migrate().await;
    let claimed = claim(&store).await;
    postgres_run(store.pool(), &format!("DROP TABLE {table}")).await;
    let migrated = migrated.map_err(|error| {
        assert_misconfigured(&error);
        error.to_string()
    });
    let claimed = claimed.expect_err("the claim is refused");
    assert_misconfigured(&claimed);
    let claimed = claimed.to_string();
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
    let error = store.migrate().await.expect_err("no such schema");
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &[&table, "CREATE SCHEMA"]);
}

/// A table named without its schema, on a connection whose `search_path`
/// names no schema that exists (`public` dropped, as hardened databases
/// do, or a schema not made yet): `migrate` said that "the schema of the
/// table" did not exist, and to create it, which did not say which
/// schema, nor where PostgreSQL had looked. It names the `search_path`,
/// and how to name the table's schema.
#[tokio::test]
async fn migrating_on_a_search_path_of_no_existing_schema_names_the_search_path() {
    let table = unique_name("idem_unplaced");
    let nowhere = unique_name("idem_no_such_schema");
    let Some(store) = postgres_with_setting(&table, "search_path", &nowhere).await else {
        return;
    };
    let error = store.migrate().await.expect_err("no schema to create in");
    assert_misconfigured(&error);
    assert_says(
        &error.to_string(),
        &[&table, "search_path", &format!("table(\"schema.{table}\")")],
    );
}

/// No table yet, on a server that takes no writes from the store (a hot
/// standby, `default_transaction_read_only`): `migrate` failed on "cannot
/// execute CREATE TABLE in a read-only transaction" as an outage, though
/// it is documented to refuse such a server as a setup to change, as it
/// does once the table exists; a start that retries `migrate` while it
/// meets an outage retried for good. It refuses it before it creates
/// anything, and says which setting to turn off.
#[tokio::test]
async fn migrating_a_missing_postgres_table_on_a_read_only_server_is_a_setup_to_change() {
    let table = unique_name("idem_read_only");
    let setting = "default_transaction_read_only";
    let Some(store) = postgres_with_setting(&table, setting, "on").await else {
        return;
    };
    let error = store.migrate().await.expect_err("nothing may be created");
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &["read-only", setting]);
}

/// Purging before `migrate` ran names it, as requests do.
#[tokio::test]
async fn purging_a_missing_postgres_table_names_migrate() {
    let Some((store, _)) = postgres_on(&unique_name("idem_never_migrated")).await else {
        return;
    };
    let error = store.purge_expired().await.expect_err("no table");
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &["PostgresStore::migrate()"]);
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
    postgres_run(owner.pool(), &format!("CREATE ROLE {role} LOGIN")).await;
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let connected = PostgresStore::connect_with(options.username(&role))
        .await
        .map(|connected| connected.pool().clone());
    let outcome = match &connected {
        Ok(pool) => {
            let store = PostgresStore::builder(pool.clone())
                .table(table.as_str())
                .build()
                .expect("valid table name");
            Ok((store.migrate().await, claim(&store).await))
        }
        Err(error) => Err(error.to_string()),
    };
    if let Ok(pool) = connected {
        pool.close().await;
    }
    postgres_run(
        owner.pool(),
        &format!("DROP TABLE {table}; DROP ROLE {role}"),
    )
    .await;
    let (migrated, claimed) = outcome.expect("connect as the role");
    let migrate_error = migrated.expect_err("the role may not use the table");
    assert_misconfigured(&migrate_error);
    let migrate_error = migrate_error.to_string();
    let claimed = claimed.expect_err("the claim is refused");
    assert_misconfigured(&claimed);
    let claimed = claimed.to_string();
    assert_says(
        &migrate_error,
        &[&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON \"{table}\" TO \"{role}\""
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
        let error = RedisStore::connect(url).await.expect_err(url);
        assert_misconfigured(&error);
        assert_says(&error.to_string(), &["redis://:password@host:6379/0"]);
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
    assert_outage(&error);
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
    let error = connected.expect_err("no password given");
    assert_misconfigured(&error);
    assert_says(
        &error.to_string(),
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
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &["fewer databases", "`databases`"]);
}

/// A key under the store's prefix that holds a hash (another
/// application's): the claim names the key and says to change the prefix.
#[tokio::test]
async fn a_redis_key_of_another_type_names_the_key_and_the_prefix() {
    let Some(url) = backend_url(REDIS) else {
        return;
    };
    let store = RedisStore::builder(redis_connection(&url).await)
        .prefix(unique_name("idem_test") + ":")
        .build();
    let redis_key = store.redis_key(&record_key("k"));
    let mut connection = redis_connection(&url).await;
    hash_at(&mut connection, &redis_key).await;
    let claimed = claim(&store).await;
    delete(&mut connection, &redis_key).await;
    let error = claimed.expect_err("the claim is refused");
    assert_misconfigured(&error);
    assert_says(
        &error.to_string(),
        &[
            &redis_key,
            "RedisStoreBuilder::prefix",
            "or delete that key",
        ],
    );
}

/// The refusal of a claim on a store connected to the Redis at `url`, or
/// the connection's own error.
async fn redis_claim_refusal(url: &str) -> Result<StoreError, StoreError> {
    let store = RedisStore::connect(url).await?;
    Ok(claim_refusal(&store).await)
}

/// A Redis at its `maxmemory` under `noeviction` refuses the claim's
/// write: told as such, with what to change, and as an outage, since
/// records expiring free room without anyone changing anything.
#[tokio::test]
async fn a_full_redis_names_maxmemory_and_is_an_outage() {
    if backend_url(REDIS).is_none() {
        return;
    }
    let settings = ["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"];
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &settings).await;
    let mut filler = redis_connection(&redis.url()).await;
    let mut full = false;
    for batch in 0..64 {
        let value = vec![b'x'; 64 * 1024];
        let filled: Result<(), _> = redis::cmd("SET")
            .arg(format!("filler:{batch}"))
            .arg(value)
            .query_async(&mut filler)
            .await;
        if filled.is_err_and(|error| error.code() == Some("OOM")) {
            full = true;
            break;
        }
    }
    let refused = redis_claim_refusal(&redis.url()).await;
    redis.stop().await;
    assert!(full, "the server never filled up");
    let error = refused.expect("connect to a full Redis");
    assert_outage(&error);
    assert_says(&error.to_string(), &["OOM", "maxmemory", "noeviction"]);
}

/// A store pointed at a read-only replica: every claim is refused with
/// READONLY, and the error says to give it the primary. It is an outage,
/// not a setup to change: during a failover the old primary comes back as
/// a replica at the address the store connects to, until a name or proxy
/// in front of it follows the new primary, and a client told not to
/// retry soon would give up on a store about to serve again.
#[tokio::test]
async fn a_redis_replica_is_an_outage_that_says_to_connect_to_the_primary() {
    if backend_url(REDIS).is_none() {
        return;
    }
    // A replica of a primary that is not there is read-only all the same.
    let primary_port = OwnRedis::free_port().to_string();
    let settings = ["--replicaof", "127.0.0.1", primary_port.as_str()];
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &settings).await;
    let refused = redis_claim_refusal(&redis.url()).await;
    redis.stop().await;
    let error = refused.expect("connect to the replica");
    assert_outage(&error);
    assert_says(
        &error.to_string(),
        &[
            "read only replica",
            "failover",
            "give it the primary's address",
        ],
    );
}

/// A Redis that cannot save its snapshot refuses writes
/// (`stop-writes-on-bgsave-error`) until a save succeeds, which it tries
/// again by itself (once a full disk has room, say): an outage, whose
/// error says to look in Redis's log.
#[tokio::test]
async fn a_redis_that_cannot_save_is_an_outage_that_says_to_look_at_its_log() {
    if backend_url(REDIS).is_none() {
        return;
    }
    let dir = TempDir::new();
    let Some(unwritable) = Unwritable::new(dir.path()) else {
        return;
    };
    let dir_name = dir.path().display().to_string();
    let settings = ["--save", "3600 1", "--dir", dir_name.as_str()];
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &settings).await;
    let connected = RedisStore::connect(&redis.url()).await;
    let mut admin = redis_connection(&redis.url()).await;
    let _: Result<String, _> = redis::cmd("BGSAVE").query_async(&mut admin).await;
    let mut failed = false;
    for _ in 0..200 {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut admin)
            .await
            .expect("INFO");
        if info.contains("rdb_last_bgsave_status:err") {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = match &connected {
        Ok(store) => Ok(claim_refusal(store).await),
        Err(error) => Err(error.to_string()),
    };
    // A store that connects now is refused its `PING`.
    let refused_at_connect = RedisStore::connect(&redis.url()).await.err();
    redis.stop().await;
    drop(unwritable);
    assert!(failed, "the snapshot did not fail");
    let refused = refused.expect("connect before the snapshot failed");
    let refused_at_connect = refused_at_connect.expect("PING refused");
    for error in [refused, refused_at_connect] {
        assert_outage(&error);
        assert_says(&error.to_string(), &["MISCONF", "Redis's log"]);
    }
}

/// A Redis user whose ACL does not reach the store's keys: the error
/// names the key and the ACL to give.
#[tokio::test]
async fn a_redis_user_without_the_acl_for_the_store_is_told_what_to_allow() {
    if backend_url(REDIS).is_none() {
        return;
    }
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let mut admin = redis_connection(&redis.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "narrow", "on", ">secret", "~other:*", "+@all"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let url = redis.url().replace("redis://", "redis://narrow:secret@");
    let store = RedisStore::connect(&url).await;
    let refused = match &store {
        Ok(store) => Ok((
            claim_refusal(store).await,
            store.redis_key(&record_key("k")),
        )),
        Err(error) => Err(error.to_string()),
    };
    redis.stop().await;
    let (error, redis_key) = refused.expect("connect as the narrow user");
    assert_misconfigured(&error);
    assert_says(
        &error.to_string(),
        &["no permissions", &redis_key, "ACL SETUSER"],
    );
}

/// A Redis user whose ACL allows `SET` and `GET` but not one of the
/// scripting commands was accepted: its claims succeeded, and every
/// completion, renewal and release failed, so no response was stored and a
/// retry after the lease lapsed ran the handler again. `connect` refuses
/// it, naming the server and what to allow: all of scripting taken away,
/// or only `EVALSHA`.
#[tokio::test]
async fn a_redis_user_that_may_not_run_scripts_is_refused_at_connect() {
    let Some(url) = backend_url(REDIS) else {
        return;
    };
    let server = redis::Client::open(url.as_str())
        .expect("valid URL")
        .get_connection_info()
        .addr()
        .to_string();
    let mut admin = redis_connection(&url).await;
    let mut refusals = Vec::new();
    for taken_away in ["-@scripting", "-evalsha", "-eval"] {
        let user = unique_name("idem_noscript");
        let rules = ["SETUSER", &user, "on", ">pw", "~*", "+@all", taken_away];
        let _: () = redis::cmd("ACL")
            .arg(&rules)
            .query_async(&mut admin)
            .await
            .expect("ACL SETUSER");
        let as_user = url.replacen("redis://", &format!("redis://{user}:pw@"), 1);
        let connected = RedisStore::connect(&as_user).await.map(drop);
        let _: () = redis::cmd("ACL")
            .arg(&["DELUSER", &user])
            .query_async(&mut admin)
            .await
            .expect("ACL DELUSER");
        refusals.push((taken_away, connected));
    }
    for (taken_away, connected) in refusals {
        let error = connected.expect_err(taken_away);
        assert_misconfigured(&error);
        assert_says(
            &error.to_string(),
            &[&server, "Lua scripts", "+@scripting", "ACL SETUSER"],
        );
    }
}

/// The ACL line a refused Redis user is told to run is enough for the
/// store: a user that may run nothing, given that line, passes every
/// check of the store contract, and a renewal after the application's
/// clock stepped back, whose script pushes the key's expiry on with
/// `PTTL` and `PEXPIRE`. Redis checks the commands a script calls against
/// the same user: a line without `DEL`, `PTTL` and `PEXPIRE` let claims
/// through and refused every release and such renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_a_refused_redis_user_is_told_to_set_lets_the_store_serve() {
    use idempotent_core::clock::{Clock as _, ManualClock};
    use idempotent_core::testing::contract;

    if backend_url(REDIS).is_none() {
        return;
    }
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let mut admin = redis_connection(&redis.url()).await;
    let nothing = ["SETUSER", "narrow", "on", ">secret", "resetkeys", "-@all"];
    let _: () = redis::cmd("ACL")
        .arg(&nothing)
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let narrow = redis_connection(&redis.url().replace("redis://", "redis://narrow:secret@")).await;
    let prefix = unique_name("idem_acl") + ":";
    let refused = RedisStore::builder(narrow.clone())
        .prefix(prefix.clone())
        .build();
    let error = claim_refusal(&refused).await.to_string();
    let told = suggested_sql(&error)
        .replace("<user>", "narrow")
        .replace("<prefix>", &prefix);
    let words: Vec<&str> = told.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"ACL"), "no ACL line in: {error}");

    // A line short of a command only a script calls: Redis refuses it
    // with a plain `ERR`, which must be told as the ACL it is too.
    let short: Vec<&str> = words
        .iter()
        .copied()
        .filter(|word| *word != "+pttl")
        .collect();
    let _: () = redis::cmd("ACL")
        .arg(&short[1..])
        .query_async(&mut admin)
        .await
        .expect("the short ACL line runs");
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(narrow.clone())
        .prefix(format!("{prefix}short:"))
        .clock(clock.clone())
        .build();
    let Ok(Claim::Acquired(token)) = claim(&store).await else {
        panic!("a new key is claimed");
    };
    clock.set(clock.now_millis() - 600_000);
    let short_refused = store
        .renew(&record_key("k"), token, Duration::from_secs(3))
        .await
        .expect_err("PTTL is refused");
    assert_misconfigured(&short_refused);
    assert_says(&short_refused.to_string(), &["ACL SETUSER"]);

    let _: () = redis::cmd("ACL")
        .arg(&words[1..])
        .query_async(&mut admin)
        .await
        .expect("the ACL line runs");

    contract::run_all(|clock| {
        let store = RedisStore::builder(narrow.clone())
            .prefix(format!("{prefix}{}:", unique_name("contract")))
            .clock(clock)
            .build();
        async move { store }
    })
    .await;
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(narrow.clone())
        .prefix(prefix.clone())
        .clock(clock.clone())
        .build();
    let lease = Duration::from_secs(3);
    let Ok(Claim::Acquired(token)) = claim(&store).await else {
        panic!("a new key is claimed");
    };
    clock.set(clock.now_millis() - 600_000);
    let renewed = store.renew(&record_key("k"), token, lease).await;
    redis.stop().await;
    renewed.expect("a renewal after the clock stepped back, under the ACL told");
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

/// A store on `records.db` in `dir`, not migrated.
async fn sqlite_in(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(dir.path().join("records.db"))
        .await
        .expect("open")
}

async fn sqlite_open_error(path: &Path) -> String {
    let opened = SqliteStore::open(path).await;
    let error = opened.expect_err("cannot be opened");
    assert_misconfigured(&error);
    error.to_string()
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

/// A path SQLite cannot be given (not UTF-8, or holding a NUL byte, as a
/// name read from bytes may): it never opens, and was told as an outage
/// that may pass, which a service's start retries for good. It is a
/// setup to change, naming the path and why.
#[tokio::test]
async fn a_sqlite_path_sqlite_cannot_take_is_refused() {
    use std::os::unix::ffi::OsStrExt as _;

    let dir = TempDir::new();
    let not_utf8 = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"records-\xff.db"));
    let error = sqlite_open_error(&not_utf8).await;
    assert_says(&error, &["records-", "UTF-8"]);
    let error = sqlite_open_error(&dir.path().join("records\0.db")).await;
    assert_says(&error, &["NUL"]);
}

/// A URL of another store was read as a file name (and the file
/// created): it is refused, saying what URL to give.
#[tokio::test]
async fn a_url_that_is_not_sqlite_is_refused() {
    let connected = SqliteStore::connect("postgres://127.0.0.1/records").await;
    let error = connected.expect_err("not a SQLite URL");
    assert_misconfigured(&error);
    assert_says(
        &error.to_string(),
        &["not a SQLite URL", "sqlite://idempotency.db"],
    );
}

/// An empty path or URL (an unset variable read as `""`) was opened
/// without a word: SQLite keeps such a database in a temporary file of
/// the connection's own, deleted when it closes, so every record went
/// with a restart and each retry after it ran its handler again. It is
/// refused, saying what to name; an in-memory database asked for by
/// name is still opened.
#[tokio::test]
async fn an_empty_sqlite_path_is_refused() {
    let opened = SqliteStore::open("").await;
    let error = opened.expect_err("an empty path names no file");
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &["no SQLite database file was named"]);
    for url in ["sqlite://", "sqlite:"] {
        let connected = SqliteStore::connect(url).await;
        let error = connected.expect_err(url);
        assert_misconfigured(&error);
        assert_says(
            &error.to_string(),
            &["SqliteStore::open(\"idempotency.db\")"],
        );
    }
    for in_memory in ["sqlite://?mode=memory", "sqlite::memory:"] {
        let store = SqliteStore::connect(in_memory).await.expect(in_memory);
        store.migrate().await.expect("migrate in memory");
    }
}

/// Before `migrate`, requests name it.
#[tokio::test]
async fn a_missing_sqlite_table_names_migrate() {
    let dir = TempDir::new();
    let store = sqlite_in(&dir).await;
    assert_says(&claim_error(&store).await, &["SqliteStore::migrate()"]);
    let error = store.purge_expired().await.expect_err("no table");
    assert_misconfigured(&error);
    assert_says(&error.to_string(), &["SqliteStore::migrate()"]);
}

/// A table of the store's name made by something else: `migrate`, which
/// succeeded when the table had an `expires_at`, refuses it, and requests
/// name the cause.
#[tokio::test]
async fn a_sqlite_table_made_by_something_else_is_refused_by_migrate() {
    let dir = TempDir::new();
    let store = sqlite_in(&dir).await;
    sqlx::raw_sql("CREATE TABLE idempotency_records (id INTEGER PRIMARY KEY, expires_at TEXT)")
        .execute(store.pool())
        .await
        .expect("create another table");
    let error = store.migrate().await.expect_err("not the store's table");
    assert_misconfigured(&error);
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
    let opened = sqlite_in(&dir).await;
    let store = SqliteStore::builder(opened.pool().clone())
        .table("archive.records")
        .build()
        .expect("valid table name");
    let error = store.migrate().await.expect_err("no such schema");
    assert_misconfigured(&error);
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
    assert_says(&error, &["read-only", "without `mode=ro`"]);
}

/// `migrate` is documented to fail on a read-only file, so that a
/// service that cannot work stops at its start. Its `CREATE TABLE IF NOT
/// EXISTS` writes nothing where the table exists, as at every restart: a
/// database opened read-only (`mode=ro`, `immutable=1`) passed, and each
/// keyed request was answered 500 after. `migrate` refuses it.
#[tokio::test]
async fn migrating_a_read_only_sqlite_database_says_so() {
    let dir = TempDir::new();
    let file = dir.path().join("records.db");
    migrated_sqlite(&file).await;
    for flag in ["mode=ro", "immutable=1"] {
        let url = format!("sqlite://{}?{flag}", file.display());
        let store = SqliteStore::connect(&url).await.expect("open read-only");
        let error = store.migrate().await.expect_err(flag);
        assert_misconfigured(&error);
        assert_says(&error.to_string(), &["read-only", flag]);
    }
}

/// A database opened with `immutable=1` (read-only media to SQLite, which
/// then also ignores the `-wal` file and every lock) takes no claim: the
/// error told to open it without `mode=ro`, which the URL did not have.
/// It names `immutable` too.
#[tokio::test]
async fn an_immutable_sqlite_database_says_so() {
    let dir = TempDir::new();
    let file = dir.path().join("records.db");
    migrated_sqlite(&file).await;
    let url = format!("sqlite://{}?immutable=1", file.display());
    let store = SqliteStore::connect(&url).await.expect("open immutable");
    let error = claim_error(&store).await;
    assert_says(&error, &["read-only", "immutable=1"]);
}

/// Keeps this process from writing `path` while it lives: by its mode,
/// or, for root, whom modes do not stop, by making it immutable
/// (`chattr +i`). `None`, after saying so, where neither stops a write.
struct Unwritable {
    path: PathBuf,
    immutable: bool,
}

impl Unwritable {
    fn new(path: &Path) -> Option<Self> {
        use std::os::unix::fs::PermissionsExt as _;

        let mode = if path.is_dir() { 0o555 } else { 0o444 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let mut unwritable = Self {
            path: path.to_owned(),
            immutable: false,
        };
        if !unwritable.writable() {
            return Some(unwritable);
        }
        let chattr = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status();
        unwritable.immutable = chattr.is_ok_and(|status| status.success());
        if unwritable.writable() {
            let _ = writeln!(
                std::io::stderr(),
                "skipped: cannot make {} unwritable here",
                path.display()
            );
            return None;
        }
        Some(unwritable)
    }

    /// Whether a write to the path, or to a new file in it, succeeds.
    fn writable(&self) -> bool {
        if !self.path.is_dir() {
            return std::fs::OpenOptions::new()
                .append(true)
                .open(&self.path)
                .is_ok();
        }
        let probe = self.path.join("write-probe");
        let created = std::fs::File::create(&probe).is_ok();
        let _ = std::fs::remove_file(&probe);
        created
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;

        if self.immutable {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.path)
                .status();
        }
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755));
    }
}

/// A copy at `file` of a database migrated elsewhere, as a file copied
/// there would be: out of WAL mode, with no connection to it open and no
/// `-wal` or `-shm` file beside it. Not the migrated file itself once its
/// pool is closed: sqlx's `Pool::close` may return while a connection of
/// the pool is still closing, and that connection, still open, keeps the
/// WAL files and lets a later connection write through them.
async fn copied_sqlite(file: &Path) {
    let source = TempDir::new();
    let store = sqlite_in(&source).await;
    store.migrate().await.expect("migrate");
    sqlx::query("VACUUM INTO ?1")
        .bind(file.display().to_string())
        .execute(store.pool())
        .await
        .expect("copy the database");
}

/// A migrated database at `file` in WAL mode, as the store leaves it, its
/// connections closed (its `-wal` and `-shm` files gone with them): one
/// connection, which `close` closes before it returns.
async fn migrated_sqlite(file: &Path) {
    copied_sqlite(file).await;
    let mut connection = SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .expect("open the copy");
    sqlx::raw_sql("PRAGMA journal_mode = WAL")
        .execute(&mut connection)
        .await
        .expect("enter WAL mode");
    connection.close().await.expect("close");
}

/// The text of the store's first failure on `file`, at open or at its
/// first claim, while the process may not write `path` (the file, or its
/// directory); the failure must be a setup to change. `None` where
/// nothing here stops a write.
async fn sqlite_failure_while_unwritable(file: &Path, path: &Path) -> Option<String> {
    let unwritable = Unwritable::new(path)?;
    let error = match SqliteStore::open(file).await {
        Err(error) => error,
        Ok(store) => claim_refusal(&store).await,
    };
    drop(unwritable);
    assert_misconfigured(&error);
    Some(error.to_string())
}

/// A database file the process may not write (its mode, a read-only
/// mount): SQLite opens it read-only without a word, and every claim
/// failed on "attempt to write a readonly database" with a hint to open
/// it read-write, which the URL already did. The error names the file
/// and the causes to look at.
#[tokio::test]
async fn a_sqlite_file_the_process_may_not_write_is_named() {
    let dir = TempDir::new();
    let file = dir.path().join("records.db");
    migrated_sqlite(&file).await;
    let Some(error) = sqlite_failure_while_unwritable(&file, &file).await else {
        return;
    };
    assert_says(
        &error,
        &[
            &file.display().to_string(),
            "read-only",
            "let the process write the file and its directory",
        ],
    );
}

/// A database in a directory the process may not write: SQLite cannot
/// create the `-wal` and `-shm` files beside it, and says only "unable to
/// open database file". The error names the file and the directory.
#[tokio::test]
async fn a_sqlite_directory_the_process_may_not_write_is_named() {
    let dir = TempDir::new();
    let file = dir.path().join("records.db");
    copied_sqlite(&file).await;
    let Some(error) = sqlite_failure_while_unwritable(&file, dir.path()).await else {
        return;
    };
    assert_says(
        &error,
        &[&file.display().to_string(), "its directory", "-wal"],
    );
}

/// A store on a pool of the application's own that opens its connections
/// when first used (`connect_lazy_with`), as a pool also reopens those it
/// closed once idle or old: a file in a missing directory, or in one the
/// process may not write, failed every claim as an outage, "unable to
/// open database file" without the file, where `open` names it and why.
#[tokio::test]
async fn a_sqlite_file_a_lazy_pool_cannot_open_is_named() {
    let dir = TempDir::new();
    let missing = dir.path().join("missing").join("records.db");
    let error = claim_error(&lazily_on(&missing)).await;
    assert_says(&error, &[&missing.display().to_string(), "does not exist"]);
    let file = dir.path().join("records.db");
    copied_sqlite(&file).await;
    let Some(_unwritable) = Unwritable::new(dir.path()) else {
        return;
    };
    let error = claim_error(&lazily_on(&file)).await;
    assert_says(&error, &[&file.display().to_string(), "its directory"]);
}

/// A store on a pool that opens `file`, in WAL mode, at its first use.
fn lazily_on(file: &Path) -> SqliteStore {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(file)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = sqlx::sqlite::SqlitePoolOptions::new().connect_lazy_with(options);
    SqliteStore::builder(pool)
        .build()
        .expect("valid table name")
}

/// A database that cannot grow (a full disk; here, a file at its
/// `max_page_count`): SQLite says "database or disk is full". Claims are
/// refused as in an outage, since freeing space ends it, and the error
/// says what to free.
#[tokio::test]
async fn a_full_sqlite_database_is_an_outage_that_says_what_to_free() {
    let dir = TempDir::new();
    let file = dir.path().join("records.db");
    migrated_sqlite(&file).await;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&file)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .pragma("max_page_count", "8");
    let pool = sqlx::SqlitePool::connect_with(options).await.expect("open");
    let store = SqliteStore::builder(pool)
        .build()
        .expect("valid table name");
    let mut refused = None;
    for n in 0..2000 {
        let key = record_key(&format!("key-{n}"));
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        if let Err(error) = store
            .claim(&key, fingerprint, Duration::from_secs(60))
            .await
        {
            refused = Some(error);
            break;
        }
    }
    store.pool().close().await;
    let error = refused.expect("a claim that finds the database full");
    assert_outage(&error);
    assert_says(
        &error.to_string(),
        &["database or disk is full", "free space on the disk"],
    );
}
