//! The SQL stores' tables changed under a running service, after
//! `migrate` accepted them, and the server's own setup where it differs
//! from the one `migrate` saw: a column's type changed, a column dropped
//! or renamed, a table renamed, a constraint or index added by a careless
//! migration of the application; prepared statements the server lost; a
//! server that ends idle connections. Each is named for what it is (a setup
//! to change, with the table, or a record the store cannot read), not
//! answered 503 for good, and nothing runs twice. PostgreSQL tests need
//! `IDEMPOTENT_TEST_POSTGRES_URL`; SQLite ones use temporary files.

use crate::store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::Idempotency;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, SqliteStore, Store, StoreError};
use store_support::logs::Events;
use store_support::tables::{migrated_on_pool, migrated_postgres};
use store_support::{
    Ledger, Reply, TempDb, backend_url, pay, payments_app, payments_app_on, unique_name,
};
use tracing::Level;

const POSTGRES: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
const TIMEOUT: Duration = Duration::from_secs(5);
const LEASE: Duration = Duration::from_secs(60);

/// The record of `key` as the payments app addresses it (global scope).
fn record_key(key: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(key.as_bytes()).expect("valid key"),
    )
}

async fn claim(store: &impl Store, key: &str) -> Result<Claim, StoreError> {
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    store.claim(&record_key(key), fingerprint, LEASE).await
}

/// A stored 201 with a header, as a payment's response.
fn created() -> StoredResponse {
    StoredResponse::new(
        StatusCode::CREATED,
        vec![(
            axum::http::header::LOCATION,
            axum::http::HeaderValue::from_static("/payments/1"),
        )],
        Some("{}".into()),
    )
}

fn assert_says(error: &str, words: &[&str]) {
    for word in words {
        assert!(error.contains(word), "`{word}` missing from: {error}");
    }
}

/// `reply` is a 500 problem of `kind` without `Retry-After`: a retry soon
/// after fails the same way until someone changes the table.
fn assert_refused_for_good(reply: &Reply, kind: &str) {
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
    assert!(reply.headers.get("retry-after").is_none(), "{reply:?}");
    assert_eq!(reply.content_type(), Some("application/problem+json"));
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    assert_eq!(body["type"], format!("urn:idempotent:{kind}"), "{body}");
}

// ===== PostgreSQL =====

/// Runs `sql` on the store's pool, with `{table}` standing for the
/// store's table, as a migration of the application's, or a pooler, would.
async fn run_sql(store: &PostgresStore, sql: &str) {
    let sql = sql.replace("{table}", store.table());
    sqlx::raw_sql(&sql)
        .execute(store.pool())
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
}

async fn drop_tables(store: &PostgresStore, tables: &[&str]) {
    for table in tables {
        run_sql(store, &format!("DROP TABLE IF EXISTS {table}")).await;
    }
}

/// The last of `keys` claimed on a table of its own, named after `name`,
/// migrated then altered by `alteration` (the tables gone afterwards),
/// as its error; and the table's name. The claims before it say what it
/// met (`first claim:` in an assertion's message).
async fn last_claim_on_altered(
    url: &str,
    name: &str,
    alteration: &str,
    keys: &[&str],
) -> (String, StoreError, Vec<Result<Claim, StoreError>>) {
    let table = unique_name(name);
    let store = migrated_postgres(url, &table).await;
    run_sql(&store, alteration).await;
    let mut claims = Vec::new();
    for key in keys {
        claims.push(claim(&store, key).await);
    }
    drop_tables(&store, &[&table, &format!("{table}_old")]).await;
    let error = claims.pop().expect("a key").expect_err(alteration);
    (table, error, claims)
}

/// An application's migration widened `status` (`smallint` to
/// `integer`, as an ORM that maps every integer so does) after a payment
/// was stored. Its retry met the connection's prepared claim ("cached
/// plan must not change result type") or, on a new connection, a value
/// that does not read as `i16`: a 503 for good, and with `fail_open` the
/// payment ran a second time. The row is a record of a request that
/// ran: it is answered as a record the store cannot read, naming the
/// column and the table, and nothing runs again.
#[tokio::test]
async fn a_retry_after_a_column_type_change_is_not_run_again() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let table = unique_name("idem_altered_type");
    let store = migrated_postgres(&url, &table).await;
    let ledger = Ledger::default();
    let idempotency = Idempotency::builder(store.clone())
        .store_timeout(TIMEOUT)
        .fail_open(true)
        .build();
    let app = payments_app_on(idempotency, &ledger);
    let first = pay(&app, "pay-1", 100).await;
    run_sql(
        &store,
        "ALTER TABLE {table} ALTER COLUMN status TYPE integer",
    )
    .await;
    let retry = pay(&app, "pay-1", 100).await;
    let claimed = claim(&store, "pay-1").await;
    drop_tables(&store, &[&table]).await;

    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(ledger.executions(), 1, "the retry ran the payment again");
    assert_refused_for_good(&retry, "record-corrupt");
    let error = claimed.expect_err("the stored response does not read");
    assert!(matches!(error, StoreError::Codec(_)), "{error:?}");
    assert_says(
        &error.to_string(),
        &[
            "`status`",
            &format!("`{table}`"),
            "PostgresStore::migrate()",
        ],
    );
}

/// A change of a column's type that the store still reads (`text[]` to
/// `varchar[]`) made every connection that had prepared a read of the
/// record fail it for as long as it lived ("cached plan must not change
/// result type"), answered 503. It runs again on a new connection.
#[tokio::test]
async fn a_readable_column_type_change_does_not_fail_prepared_statements() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let table = unique_name("idem_retyped");
    let store = migrated_postgres(&url, &table).await;
    let key = record_key("pay-1");
    let completed = match claim(&store, "pay-1").await {
        Ok(Claim::Acquired(token)) => store.complete(&key, token, created(), LEASE).await,
        other => panic!("{other:?}"),
    };
    let before = store.get(&key).await;
    let sql = "ALTER TABLE {table} ALTER COLUMN header_names TYPE varchar[]";
    run_sql(&store, sql).await;
    let after = store.get(&key).await;
    drop_tables(&store, &[&table]).await;

    completed.expect("store the response");
    let before = before.expect("read the record");
    let after = after.expect("read the record after the change");
    assert!(matches!(after, Some(Record::Completed(_))), "{after:?}");
    assert_eq!(after, before);
}

/// An application's migration added what the store's rows break: a NOT
/// NULL column without a default, a unique index that is not on (`scope`,
/// `key`), a CHECK, a narrower `key` or `expires_at`. Every claim failed
/// as an outage, a 503 for good, whose log named neither the table nor
/// the fix. It is a setup to change, named with the table.
#[tokio::test]
async fn a_table_altered_to_refuse_the_stores_rows_is_a_setup_to_change() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let alterations = [
        "ALTER TABLE {table} ADD COLUMN tenant text NOT NULL",
        "CREATE UNIQUE INDEX ON {table} (fingerprint)",
        "ALTER TABLE {table} ADD CHECK (expires_at < 1000)",
        "ALTER TABLE {table} ALTER COLUMN key TYPE varchar(8)",
        "ALTER TABLE {table} ALTER COLUMN expires_at TYPE integer",
    ];
    for alteration in alterations {
        // Two requests alike under keys longer than 8 characters: the
        // second meets a unique index on `fingerprint`.
        let keys = ["payment-0001", "payment-0002"];
        let (table, error, first) =
            last_claim_on_altered(&url, "idem_refusing", alteration, &keys).await;
        assert!(
            matches!(error, StoreError::Misconfigured(_)),
            "{alteration}: {error:?} (first claim: {first:?})"
        );
        assert_says(
            &error.to_string(),
            &[&format!("the table `{table}` refuses the store's rows")],
        );
    }
}

/// The same, over HTTP: a 500 `store-misconfigured` without
/// `Retry-After`, where it was a 503 asking for a retry in a second, for
/// good; nothing ran. Once the column has a default, the key is served.
#[tokio::test]
async fn a_not_null_column_added_after_migrate_is_a_500_until_fixed() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let table = unique_name("idem_not_null");
    let store = migrated_postgres(&url, &table).await;
    run_sql(
        &store,
        "ALTER TABLE {table} ADD COLUMN tenant text NOT NULL",
    )
    .await;
    let ledger = Ledger::default();
    let app = payments_app(store.clone(), &ledger, TIMEOUT);
    let refused = pay(&app, "pay-1", 100).await;
    let executions_refused = ledger.executions();
    run_sql(
        &store,
        "ALTER TABLE {table} ALTER COLUMN tenant SET DEFAULT 'a'",
    )
    .await;
    let fixed = pay(&app, "pay-1", 100).await;
    drop_tables(&store, &[&table]).await;

    assert_refused_for_good(&refused, "store-misconfigured");
    assert_eq!(executions_refused, 0);
    assert_eq!(fixed.status, StatusCode::CREATED, "{fixed:?}");
    assert_eq!(ledger.executions(), 1);
}

/// A column dropped or renamed, or the table renamed, after `migrate`:
/// the error said "column \"body\" does not exist" and suggested a table
/// of the store's own, without naming the table the store uses. It names
/// it, and `migrate`, which says what differs.
#[tokio::test]
async fn a_column_or_table_gone_after_migrate_names_the_table() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let alterations = [
        "ALTER TABLE {table} DROP COLUMN body",
        "ALTER TABLE {table} RENAME COLUMN fingerprint TO request_hash",
        "ALTER TABLE {table} RENAME TO {table}_old",
    ];
    for alteration in alterations {
        let (table, error, _) =
            last_claim_on_altered(&url, "idem_gone", alteration, &["pay-1"]).await;
        assert!(
            matches!(error, StoreError::Misconfigured(_)),
            "{alteration}: {error:?}"
        );
        assert_says(
            &error.to_string(),
            &[&format!("the table `{table}`"), "PostgresStore::migrate()"],
        );
    }
}

/// The table was made by a migration run with another `search_path` (a
/// schema of the application's own), where the service's role does not
/// look. The error said to create the table with `migrate()`, which makes
/// a second, empty table where this instance looks, apart from the
/// records of the instances that look in the schema: a key would run once
/// in each. It says that a table elsewhere is found through the role's
/// `search_path`.
#[tokio::test]
async fn a_table_out_of_the_roles_search_path_is_told_so() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let (schema, table) = (unique_name("idem_app"), unique_name("idem_elsewhere"));
    let admin = PostgresStore::connect(&url).await.expect("connect");
    run_sql(&admin, &format!("CREATE SCHEMA {schema}")).await;
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("valid URL");
    let migrator = PostgresStore::connect_with(options.options([("search_path", schema.as_str())]))
        .await
        .expect("connect with the schema on the search path");
    let migrator = PostgresStore::builder(migrator.pool().clone())
        .table(table.as_str())
        .build()
        .expect("valid table name");
    let migrated = migrator.migrate().await;
    migrator.pool().close().await;
    let service = PostgresStore::builder(admin.pool().clone())
        .table(table.as_str())
        .build()
        .expect("valid table name");
    let claimed = claim(&service, "pay-1").await;
    run_sql(&admin, &format!("DROP SCHEMA {schema} CASCADE")).await;

    migrated.expect("migrate in the schema");
    let error = claimed.expect_err("the service's role does not find the table");
    assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
    assert_says(
        &error.to_string(),
        &[
            &format!("the table `{table}` does not exist"),
            "search_path",
        ],
    );
}

/// Something sharing the store's pool ran `DISCARD ALL` on a connection
/// (as a pooler resets a connection it hands on, or an application
/// clears what it set on one): the statements the store had prepared there were
/// gone, and every statement the store ran on that connection failed,
/// for as long as it lived. The statement runs again on a new connection.
#[tokio::test]
async fn statements_discarded_on_a_shared_connection_are_prepared_again() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let pool = PostgresStore::pool_options()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let store = migrated_on_pool(pool, "idem_discarded", 0).await;
    let before = claim(&store, "before").await;
    run_sql(&store, "DISCARD ALL").await;
    let after = claim(&store, "after").await;
    let completed = match &after {
        Ok(Claim::Acquired(token)) => {
            let key = record_key("after");
            Some(store.complete(&key, *token, created(), LEASE).await)
        }
        _ => None,
    };
    let table = store.table().to_owned();
    drop_tables(&store, &[&table]).await;

    assert!(matches!(before, Ok(Claim::Acquired(_))), "{before:?}");
    assert!(matches!(after, Ok(Claim::Acquired(_))), "{after:?}");
    assert!(matches!(completed, Some(Ok(()))), "{completed:?}");
}

/// `DISCARD ALL` on one connection of the store's pool lost the
/// statements prepared on that connection alone, yet the first statement
/// to meet it closed every connection idle beside it as well, and ran
/// again on a connection opened for it. Behind PgBouncer in transaction
/// pooling, where a statement prepared on one server connection is run
/// on another now and then, each such refusal emptied the pool: a storm
/// of new connections, each a login, while none of them could help. Only
/// the connection that lost its statements is closed; the statement runs
/// again on the next one, which opens nothing.
#[tokio::test]
async fn statements_lost_on_one_connection_close_that_connection_alone() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let opened = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&opened);
    let pool = PostgresStore::pool_options()
        .max_connections(2)
        .after_connect(move |_, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        })
        .connect(&url)
        .await
        .expect("connect");
    let store = migrated_on_pool(pool, "idem_lost_on_one", 0).await;
    // With one connection taken, the claim runs on the other, which is
    // then the one to lose its statements.
    let mut other = store.pool().acquire().await.expect("a connection");
    let before = claim(&store, "before").await;
    let mut discarded = store
        .pool()
        .acquire()
        .await
        .expect("the claim's connection");
    sqlx::raw_sql("DISCARD ALL")
        .execute(&mut *discarded)
        .await
        .expect("discard the connection's state");
    // Idle in this order: the claim's connection is the next one taken.
    discarded.return_to_pool().await;
    other.return_to_pool().await;
    let opened_before = opened.load(Ordering::SeqCst);
    let after = claim(&store, "after").await;
    let opened_for_it = opened.load(Ordering::SeqCst) - opened_before;
    let table = store.table().to_owned();
    drop_tables(&store, &[&table]).await;

    assert!(matches!(before, Ok(Claim::Acquired(_))), "{before:?}");
    assert!(matches!(after, Ok(Claim::Acquired(_))), "{after:?}");
    assert_eq!(
        opened_for_it, 0,
        "the connection idle beside the one that lost its statements was closed"
    );
}

/// Statements the server lost (`DISCARD ALL` on a connection of the
/// pool, or PgBouncer in transaction pooling running them on another
/// server connection now and then) run again on another connection, and
/// most often succeed there: the log said nothing above debug, and the
/// operator learnt of a pooler set up so only from the requests that met
/// it twice in a row. The first refusal is warned of, with what to
/// change; the next ones are not, however many.
#[tokio::test]
async fn statements_the_server_lost_are_warned_of_once() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let (events, _guard) = Events::on_this_thread();
    let pool = PostgresStore::pool_options()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let store = migrated_on_pool(pool, "idem_lost_warned", 0).await;
    let mut claims = Vec::new();
    for key in ["first", "second", "third"] {
        claims.push(claim(&store, key).await);
        run_sql(&store, "DISCARD ALL").await;
    }
    let table = store.table().to_owned();
    drop_tables(&store, &[&table]).await;

    for claimed in &claims {
        assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
    }
    let warned = events.at(Level::WARN, "idempotent_core::store");
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert_says(
        warned[0].message(),
        &[
            "DISCARD ALL",
            "pool_mode = transaction",
            "max_prepared_statements",
        ],
    );
}

/// A `statement_timeout` set for the store's role (here in the
/// connection options) ran out while a claim waited for a lock another
/// connection held on the table: the error said only "canceling statement
/// due to statement timeout". It is an outage still (the lock may go),
/// and it names the timeouts, that nothing was applied, and where to
/// look for the lock; the key is free once the lock goes.
#[tokio::test]
async fn a_statement_cut_by_statement_timeout_says_what_to_look_at() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("valid URL");
    let timed = PostgresStore::connect_with(options.options([("statement_timeout", "200")]))
        .await
        .expect("connect");
    let store = PostgresStore::builder(timed.pool().clone())
        .table(unique_name("idem_timed_out"))
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    let mut locker = store.pool().begin().await.expect("begin");
    let lock = format!("LOCK TABLE {} IN EXCLUSIVE MODE", store.table());
    sqlx::raw_sql(&lock)
        .execute(&mut *locker)
        .await
        .expect("lock the table");
    let cut = claim(&store, "held-up").await;
    locker.rollback().await.expect("let the lock go");
    let after = claim(&store, "held-up").await;
    let table = store.table().to_owned();
    drop_tables(&store, &[&table]).await;

    let error = cut.expect_err("the claim waits longer than the statement timeout");
    assert!(matches!(error, StoreError::Backend(_)), "{error:?}");
    assert_says(
        &error.to_string(),
        &["statement_timeout", "applied none", "pg_locks"],
    );
    assert!(matches!(after, Ok(Claim::Acquired(_))), "{after:?}");
}

/// A server that ends idle connections (`idle_session_timeout`, set by a
/// DBA for the role or the database) closes the connections the store
/// and its pool keep between statements: the next statement on each
/// runs on another, and the request that holds a claim stores its
/// response.
#[tokio::test]
async fn a_server_ending_idle_connections_costs_no_request() {
    let Some(url) = backend_url(POSTGRES) else {
        return;
    };
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("valid URL");
    let options = options.options([("idle_session_timeout", "300")]);
    let pool = PostgresStore::pool_options()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("connect");
    let store = migrated_on_pool(pool, "idem_idle_ended", 2).await;
    let held = claim(&store, "held").await;
    // Past the server's 300 ms, and past the second after which the
    // store hands kept connections back to the pool.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let completed = match &held {
        Ok(Claim::Acquired(token)) => {
            let key = record_key("held");
            Some(store.complete(&key, *token, created(), LEASE).await)
        }
        _ => None,
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let next = claim(&store, "next").await;
    let record = store.get(&record_key("held")).await;
    let table = store.table().to_owned();
    let admin = PostgresStore::connect(&url).await.expect("connect");
    drop_tables(&admin, &[&table]).await;

    assert!(matches!(held, Ok(Claim::Acquired(_))), "{held:?}");
    assert!(matches!(completed, Some(Ok(()))), "{completed:?}");
    assert!(matches!(next, Ok(Claim::Acquired(_))), "{next:?}");
    assert!(
        matches!(record, Ok(Some(Record::Completed(_)))),
        "{record:?}"
    );
}

// ===== SQLite =====

/// A store on `table` of a new file, migrated.
async fn migrated_sqlite(file: &TempDb, table: &str) -> SqliteStore {
    let opened = SqliteStore::open(&file.0).await.expect("open");
    let store = SqliteStore::builder(opened.pool().clone())
        .table(table)
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

async fn sqlite_run(store: &SqliteStore, sql: &str) {
    let sql = sql.replace("{table}", store.table());
    sqlx::raw_sql(&sql)
        .execute(store.pool())
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
}

/// A unique index on `fingerprint` added after `migrate`: the second
/// request alike, under another key, failed as an outage, for as long as
/// the first one's record was kept. It is a setup to change, named with
/// the table.
#[tokio::test]
async fn a_sqlite_index_added_after_migrate_is_a_setup_to_change() {
    let file = TempDb::new();
    let store = migrated_sqlite(&file, "payments_idempotency").await;
    sqlite_run(
        &store,
        "CREATE UNIQUE INDEX by_request ON {table} (fingerprint)",
    )
    .await;
    let first = claim(&store, "pay-1").await;
    let second = claim(&store, "pay-2").await;
    store.pool().close().await;

    assert!(matches!(first, Ok(Claim::Acquired(_))), "{first:?}");
    let error = second.expect_err("the index refuses the second row");
    assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
    assert_says(
        &error.to_string(),
        &["the table `payments_idempotency` refuses the store's rows"],
    );
}

/// A column dropped, or the table renamed, after `migrate`: the error
/// names the table and `migrate`.
#[tokio::test]
async fn a_sqlite_column_or_table_gone_after_migrate_names_the_table() {
    for alteration in [
        "ALTER TABLE {table} DROP COLUMN record",
        "ALTER TABLE {table} RENAME TO old_payments_idempotency",
    ] {
        let file = TempDb::new();
        let store = migrated_sqlite(&file, "payments_idempotency").await;
        sqlite_run(&store, alteration).await;
        let claimed = claim(&store, "pay-1").await;
        store.pool().close().await;

        let error = claimed.expect_err(alteration);
        assert!(
            matches!(error, StoreError::Misconfigured(_)),
            "{alteration}: {error:?}"
        );
        assert_says(
            &error.to_string(),
            &["the table `payments_idempotency`", "SqliteStore::migrate()"],
        );
    }
}

/// A row whose `expires_at` is not a number (written by a script, or
/// kept through a change of the column's type): the record is one the
/// store cannot read, and the error names the column and the table.
#[tokio::test]
async fn a_sqlite_value_of_another_type_names_its_column() {
    let file = TempDb::new();
    let store = migrated_sqlite(&file, "payments_idempotency").await;
    let scope = ScopeDigest::global();
    sqlx::query(
        "INSERT INTO payments_idempotency (scope, key, fingerprint, lease_token, expires_at)
         VALUES (?1, 'pay-1', ?2, ?3, 'tomorrow')",
    )
    .bind(scope.as_bytes().as_slice())
    .bind([7_u8; 32].as_slice())
    .bind([1_u8; 16].as_slice())
    .execute(store.pool())
    .await
    .expect("insert a row by hand");
    let claimed = claim(&store, "pay-1").await;
    store.pool().close().await;

    let error = claimed.expect_err("the row does not read");
    assert!(matches!(error, StoreError::Codec(_)), "{error:?}");
    assert_says(
        &error.to_string(),
        &["`expires_at`", "`payments_idempotency`"],
    );
}
