//! What `PostgresStore::migrate` warns of, while it accepts the setup: a
//! store whose records a crash, a failover or another instance may not
//! see as it wrote them, so that a request runs again, without a word in
//! the log. Needs `IDEMPOTENT_TEST_POSTGRES_URL`.

use crate::store_support;

use std::str::FromStr;

use idempotent_core::clock::{Clock, ManualClock, SystemClock};
use idempotent_core::store::{PostgresStore, PostgresStoreBuilder};
use sqlx::postgres::PgConnectOptions;
use store_support::logs::{Events, Logged};
use store_support::{backend_url, unique_name};
use tracing::Level;

/// How far behind PostgreSQL's clock the skewed store's runs: more than
/// the default lease of 60 s, so that every claim it makes has lapsed
/// already by the other instances' clocks.
const BEHIND_MS: u64 = 90_000;

/// A store connected with `options`, on a table of its own, and what
/// `migrate` warned of after `prepare` ran on a builder for that table
/// (`None` to create nothing first) and returned the store to migrate.
/// `migrate` must succeed; the table is dropped.
async fn warnings_of_migrate(
    options: PgConnectOptions,
    prepare: impl FnOnce(&str, PostgresStoreBuilder) -> (Option<String>, PostgresStore),
) -> Vec<Logged> {
    let (events, _guard) = Events::on_this_thread();
    let connected = PostgresStore::connect_with(options).await.expect("connect");
    let pool = connected.pool();
    let table = unique_name("idem_warned");
    let (create, store) = prepare(&table, PostgresStore::builder(pool.clone()).table(&table));
    if let Some(create) = create {
        sqlx::raw_sql(&create).execute(pool).await.expect("create");
    }
    let migrated = store.migrate().await;
    let drop_table = format!("DROP TABLE IF EXISTS {table}");
    sqlx::raw_sql(&drop_table)
        .execute(pool)
        .await
        .expect("drop the test table");
    migrated.expect("a warning is no reason to refuse");
    events.at(Level::WARN, "idempotent_core::store")
}

fn test_options(url: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(url).expect("a valid URL")
}

/// Asserts that `warned` is one warning, which says each of `words` and
/// names the server at `url` as the Redis store's checks name theirs: a
/// service that uses several databases was not told which one to change.
#[track_caller]
fn assert_warned_once(warned: &[Logged], url: &str, words: &[&str]) {
    assert_eq!(warned.len(), 1, "{warned:#?}");
    let told = warned[0].message();
    for word in words {
        assert!(told.contains(word), "`{word}` missing from: {told}");
    }
    let options = test_options(url);
    let server = format!("{}:{}", options.get_host(), options.get_port());
    assert_eq!(
        warned[0].field("server"),
        Some(server.as_str()),
        "{warned:#?}"
    );
}

#[tokio::test]
async fn migrate_warns_of_a_clock_far_from_postgresqls() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let in_time = warnings_of_migrate(test_options(&url), |_, builder| {
        (None, builder.build().expect("valid table name"))
    })
    .await;
    assert!(in_time.is_empty(), "{in_time:#?}");
    let warned = warnings_of_migrate(test_options(&url), |_, builder| {
        let behind = ManualClock::new(SystemClock.now_millis() - BEHIND_MS);
        (
            None,
            builder.clock(behind).build().expect("valid table name"),
        )
    })
    .await;
    assert_warned_once(
        &warned,
        &url,
        &["behind PostgreSQL's", "run a request twice", "NTP"],
    );
    let skew: u64 = warned[0]
        .field("skew_ms")
        .and_then(|skew| skew.parse().ok())
        .expect("the skew, in ms");
    assert!(skew.abs_diff(BEHIND_MS) < 1000, "{warned:#?}");
}

#[tokio::test]
async fn migrate_warns_of_an_unlogged_table() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let mut quoted = String::new();
    let warned = warnings_of_migrate(test_options(&url), |table, builder| {
        let create = PostgresStore::migration_sql(table).expect("valid table name");
        quoted = format!("ALTER TABLE \"{table}\" SET LOGGED");
        let unlogged = create.replacen("CREATE TABLE", "CREATE UNLOGGED TABLE", 1);
        (Some(unlogged), builder.build().expect("valid table name"))
    })
    .await;
    assert_warned_once(
        &warned,
        &url,
        &["UNLOGGED", "after a crash or a failover", &quoted],
    );
}

#[tokio::test]
async fn migrate_warns_of_asynchronous_commits() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let options = test_options(&url).options([("synchronous_commit", "off")]);
    let warned = warnings_of_migrate(options, |_, builder| {
        (None, builder.build().expect("valid table name"))
    })
    .await;
    assert_warned_once(
        &warned,
        &url,
        &["synchronous_commit", "SET synchronous_commit = on"],
    );
}
