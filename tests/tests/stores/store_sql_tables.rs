//! Tables of the SQL stores' columns and key that `migrate` took, and on
//! which the store then answered wrongly for good:
//! - a column the store leaves empty that is `NOT NULL` without a
//!   default (a column of the user's own, or one of the store's that it
//!   sets to NULL): every claim's `INSERT` failed, every keyed request
//!   was answered 503;
//! - `key` compared without regard to case (SQLite `COLLATE NOCASE`,
//!   PostgreSQL a nondeterministic collation), on the column or on the
//!   unique index, or (SQLite) a `key` of numeric affinity, under which
//!   `0123` and `123` are one: `abc` and `ABC` were one key, and one
//!   request was answered with the response stored for the other;
//! - a unique index beside the key that two records can collide on (on
//!   `key` alone): a caller's claim failed, 503, while another caller's
//!   record of the same key was kept;
//! - (SQLite) an `expires_at` of text or real affinity: each deadline
//!   was kept as text or a floating-point number, and no record read
//!   back, every retry of a completed request answered 500.
//!
//! And tables `migrate` judged wrongly: it refused unique indexes records
//! never collide on (an expression of a column of the user's own,
//! `lease_token`), and on PostgreSQL 11 and older, whose catalogs lack
//! columns its look at the table read, it checked nothing, or blamed a
//! missing `CREATE`.
//!
//! `migrate` refuses each, naming the column. PostgreSQL tests need
//! `IDEMPOTENT_TEST_POSTGRES_URL`; SQLite ones use a temporary file.

use crate::store_support;

use idempotent_core::store::{PostgresStore, SqliteStore, StoreError};
use store_support::tables::{PostgresTable, postgres_table, sqlite_table};
use store_support::{TempDb, backend_url, unique_name};

/// `migrated` refused the table as a setup to change, naming `words`.
#[track_caller]
fn assert_refused(migrated: Result<(), StoreError>, words: &[&str]) {
    let error = migrated.expect_err("the table is refused");
    assert!(
        matches!(error, StoreError::Misconfigured(_)),
        "not told as a setup to change: {error:?}"
    );
    let told = error.to_string();
    for word in words {
        assert!(told.contains(word), "`{word}` missing from: {told}");
    }
}

/// The PostgreSQL store's table (named `{table}`, for [`postgres_migrate`])
/// with `extra` columns (empty, or beginning with a comma, as
/// [`postgres_table`] takes them), keyed on `(scope, key)`, and beside the
/// key the unique index `{table}_extra` on `index` (a parenthesised list).
fn postgres_with_index(extra: &str, index: &str) -> String {
    format!(
        "{} ALTER TABLE {{table}} ADD PRIMARY KEY (scope, key);
         CREATE UNIQUE INDEX {{table}}_extra ON {{table}} {index};",
        postgres_table("{table}", "text", extra)
    )
}

/// The SQLite store's table with `extra` columns (empty, or beginning with
/// a comma, as [`sqlite_table`] takes them; the comma before the primary
/// key is added here), keyed on `(scope, key)`, and beside the key the
/// unique index `records_extra` on `index` (a parenthesised list).
fn sqlite_with_index(extra: &str, index: &str) -> String {
    let keyed = format!("{extra}, PRIMARY KEY (scope, key)");
    sqlite_table("TEXT NOT NULL", &keyed)
        + &format!("CREATE UNIQUE INDEX records_extra ON idempotency_records {index};")
}

/// What `migrate` answers on the table `setup` creates (its name is
/// spliced in for `{table}`); `teardown` then runs whatever it answered.
async fn postgres_migrate(setup: &str, teardown: &str) -> Option<Result<(), StoreError>> {
    let table = PostgresTable::new("idem_table").await?;
    table.execute(setup).await;
    let migrated = table.store.migrate().await;
    table
        .execute(&format!("DROP TABLE {{table}}; {teardown}"))
        .await;
    Some(migrated)
}

#[tokio::test]
async fn a_postgres_column_the_store_leaves_empty_must_not_be_required() {
    for (column, extra) in [
        ("tenant", ", tenant text NOT NULL"),
        // One of the store's: NULL once the response is stored.
        ("lease_token", ""),
    ] {
        let mut setup = postgres_table("{table}", "text", extra);
        if extra.is_empty() {
            setup = setup.replace("lease_token bytea", "lease_token bytea NOT NULL");
        }
        let setup = format!("{setup} ALTER TABLE {{table}} ADD PRIMARY KEY (scope, key);");
        let Some(migrated) = postgres_migrate(&setup, "").await else {
            return;
        };
        assert_refused(migrated, &[&format!("`{column}`"), "NOT NULL"]);
    }
}

#[tokio::test]
async fn postgres_columns_the_database_fills_may_be_required() {
    let filled = ", id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
                  n bigint GENERATED ALWAYS AS IDENTITY, m bigint NOT NULL GENERATED ALWAYS AS (expires_at + 1) STORED";
    let setup = format!(
        "{} CREATE UNIQUE INDEX ON {{table}} (scope, key);",
        postgres_table("{table}", "text", filled)
    );
    let Some(migrated) = postgres_migrate(&setup, "").await else {
        return;
    };
    migrated.expect("every required column of its own is filled by the database");
}

#[tokio::test]
async fn a_postgres_key_compared_without_regard_to_case_is_refused() {
    let collation = unique_name("idem_ci");
    let create_collation = format!(
        "CREATE COLLATION {collation} (provider = icu, locale = 'und-u-ks-level2', deterministic = false);"
    );
    let drop_collation = format!("DROP COLLATION {collation};");
    // On the column (and so on its primary key), or on the unique index
    // alone.
    let on_column = format!(
        "{create_collation} {} ALTER TABLE {{table}} ADD PRIMARY KEY (scope, key);",
        postgres_table("{table}", &format!("text COLLATE {collation}"), "")
    );
    let on_index = format!(
        "{create_collation} {} CREATE UNIQUE INDEX ON {{table}} (scope, key COLLATE {collation});",
        postgres_table("{table}", "text", "")
    );
    for setup in [on_column, on_index] {
        let Some(migrated) = postgres_migrate(&setup, &drop_collation).await else {
            return;
        };
        assert_refused(migrated, &["`key`", &collation, "case"]);
    }
}

/// What `migrate` answers on the SQLite table `setup` creates.
async fn sqlite_migrate(setup: &str) -> Result<(), StoreError> {
    let db = TempDb::new();
    let store = SqliteStore::open(&db.0).await.expect("open");
    sqlx::raw_sql(setup)
        .execute(store.pool())
        .await
        .expect("setup");
    store.migrate().await
}

#[tokio::test]
async fn a_sqlite_column_the_store_leaves_empty_must_not_be_required() {
    let keyed = ", PRIMARY KEY (scope, key)";
    let tenant = sqlite_table("TEXT NOT NULL", &format!(", tenant TEXT NOT NULL{keyed}"));
    let record =
        sqlite_table("TEXT NOT NULL", keyed).replace("record BLOB", "record BLOB NOT NULL");
    for (column, setup) in [("tenant", tenant), ("record", record)] {
        assert_refused(
            sqlite_migrate(&setup).await,
            &[&format!("`{column}`"), "NOT NULL"],
        );
    }
}

#[tokio::test]
async fn sqlite_columns_the_database_fills_may_be_required() {
    let setup = sqlite_table(
        "TEXT NOT NULL",
        ", id INTEGER PRIMARY KEY NOT NULL, at INTEGER NOT NULL DEFAULT 0,
           n INTEGER NOT NULL GENERATED ALWAYS AS (expires_at + 1)",
    ) + "CREATE UNIQUE INDEX records_key ON idempotency_records (scope, key);";
    sqlite_migrate(&setup)
        .await
        .expect("every required column of its own is filled by the database");
}

#[tokio::test]
async fn a_sqlite_key_compared_without_regard_to_case_or_trailing_spaces_is_refused() {
    let keyed = ", PRIMARY KEY (scope, key)";
    for (collation, setup) in [
        // On the column, and so on its primary key.
        (
            "NOCASE",
            sqlite_table("TEXT NOT NULL COLLATE NOCASE", keyed),
        ),
        ("RTRIM", sqlite_table("TEXT NOT NULL COLLATE RTRIM", keyed)),
        // On the column, with a unique index that compares bytes: the
        // statements' `key = ?` compares by the column's.
        (
            "collation",
            sqlite_table("TEXT NOT NULL COLLATE NOCASE", "")
                + "CREATE UNIQUE INDEX k ON idempotency_records (scope, key COLLATE BINARY);",
        ),
        // On the unique index alone.
        (
            "NOCASE",
            sqlite_table("TEXT NOT NULL", "")
                + "CREATE UNIQUE INDEX k ON idempotency_records (scope, key COLLATE NOCASE);",
        ),
    ] {
        assert_refused(sqlite_migrate(&setup).await, &["`key`", collation]);
    }
}

/// Beside the key on `(scope, key)`, a unique index that two records can
/// collide on (on `key` alone, as if keys were global; on an expression
/// of `key`): the claim of one caller's key failed for as long as another
/// caller's record of the same key was kept, answered 503 each time.
#[tokio::test]
async fn a_postgres_unique_index_records_can_collide_on_is_refused() {
    for index in ["(key)", "(scope, lower(key))", "(fingerprint)"] {
        let setup = postgres_with_index("", index);
        let Some(migrated) = postgres_migrate(&setup, "").await else {
            return;
        };
        assert_refused(migrated, &["_extra`", "unique index"]);
    }
}

/// An exclusion constraint on `key` (`EXCLUDE USING btree (key WITH =)`)
/// keeps two records of one key apart as a unique index on it does, but
/// PostgreSQL lists its index apart from unique ones: `migrate` took the
/// table, and the claim of one caller's key then failed for as long as
/// another caller's record of that key was kept, answered 503 as an
/// outage, with nothing to say what to change. One over both `scope` and
/// `key` is kept.
#[tokio::test]
async fn a_postgres_exclusion_constraint_records_can_collide_on_is_refused() {
    let constrained = |exclusion: &str| {
        format!(
            "{} ALTER TABLE {{table}} ADD PRIMARY KEY (scope, key);
             ALTER TABLE {{table}} ADD CONSTRAINT {{table}}_extra EXCLUDE USING btree {exclusion};",
            postgres_table("{table}", "text", "")
        )
    };
    let Some(migrated) = postgres_migrate(&constrained("(key WITH =)"), "").await else {
        return;
    };
    assert_refused(migrated, &["_extra`", "constraint", "DROP CONSTRAINT"]);
    let kept = postgres_migrate(&constrained("(scope WITH =, key WITH =)"), "").await;
    kept.expect("a server").expect("kept");
}

#[tokio::test]
async fn a_sqlite_unique_index_records_can_collide_on_is_refused() {
    for index in ["(key)", "(scope, lower(key))", "(fingerprint)"] {
        let setup = sqlite_with_index("", index);
        assert_refused(
            sqlite_migrate(&setup).await,
            &["`records_extra`", "unique index"],
        );
    }
}

/// Beside the key, unique indexes that records of two keys can still
/// collide on, however they are written: an expression of `key` alone, a
/// predicate on the store's columns alone, a column of the user's own
/// only `INCLUDE`d (not compared), or `lease_token` with NULLs not
/// distinct (a stored response empties it, in every completed record).
#[tokio::test]
async fn a_postgres_unique_index_on_expressions_of_the_stores_columns_is_refused() {
    for index in [
        "(lower(key))",
        "(key) WHERE status IS NULL",
        "(key) INCLUDE (tenant)",
        "(lease_token) NULLS NOT DISTINCT",
    ] {
        let setup = postgres_with_index(", tenant text", index);
        let Some(migrated) = postgres_migrate(&setup, "").await else {
            return;
        };
        assert_refused(migrated, &["_extra`", "unique index"]);
    }
}

#[tokio::test]
async fn a_sqlite_unique_index_on_expressions_of_the_stores_columns_is_refused() {
    for index in [
        "(lower(key))",
        "(key) WHERE record IS NULL",
        // The user's column's name only in a literal.
        "(coalesce(key, 'tenant'))",
    ] {
        let setup = sqlite_with_index(", tenant TEXT", index);
        assert_refused(
            sqlite_migrate(&setup).await,
            &["`records_extra`", "unique index"],
        );
    }
}

/// Unique indexes that use a column of the user's own, in an expression
/// or a predicate, are the user's to fill (and NULL, which the store
/// leaves there, is never equal to NULL); `lease_token` is random and one
/// claim's own, and NULL once its response is stored: `migrate` refused
/// each such table, and the service could not start.
#[tokio::test]
async fn unique_indexes_on_expressions_of_the_users_columns_or_the_lease_token_are_kept() {
    for index in [
        "(lower(tenant))",
        "(key) WHERE tenant IS NOT NULL",
        "(lease_token)",
        "(lease_token, expires_at)",
    ] {
        let setup = postgres_with_index(", tenant text", index);
        if let Some(migrated) = postgres_migrate(&setup, "").await {
            migrated.unwrap_or_else(|error| panic!("{index} kept: {error}"));
        }
        let setup = sqlite_with_index(", tenant TEXT", index);
        (sqlite_migrate(&setup).await).unwrap_or_else(|error| panic!("{index} kept: {error}"));
    }
}

/// A unique index that holds a column of the table's own (filled by the
/// database) or both `scope` and `key` is never met by two records.
#[tokio::test]
async fn unique_indexes_records_never_collide_on_are_kept() {
    let sqlite = sqlite_table("TEXT NOT NULL", ", serial INTEGER NOT NULL DEFAULT 0")
        + "CREATE UNIQUE INDEX records_key ON idempotency_records (scope, key);
           CREATE UNIQUE INDEX records_wide ON idempotency_records (key, scope, fingerprint);
           CREATE UNIQUE INDEX records_own ON idempotency_records (serial, key);";
    sqlite_migrate(&sqlite).await.expect("kept");
    let postgres = format!(
        "{} CREATE UNIQUE INDEX ON {{table}} (scope, key);
            CREATE UNIQUE INDEX ON {{table}} (key, scope) WHERE status IS NULL;",
        postgres_table("{table}", "text", ", id bigserial PRIMARY KEY")
    );
    if let Some(migrated) = postgres_migrate(&postgres, "").await {
        migrated.expect("kept");
    }
}

/// A `key` column that SQLite gives numeric affinity (declared `STRING`,
/// `INTEGER`, `NUMERIC`, `REAL`, ...) keeps a key that looks like a
/// number as that number: `0123`, `123` and `123.0` were one key, and
/// one request was answered with the response stored for another.
#[tokio::test]
async fn a_sqlite_key_of_numeric_affinity_is_refused() {
    let keyed = ", PRIMARY KEY (scope, key)";
    for declared in ["STRING", "INTEGER", "NUMERIC", "REAL", "BIGINT", "DATE"] {
        let setup = sqlite_table(&format!("{declared} NOT NULL"), keyed);
        assert_refused(
            sqlite_migrate(&setup).await,
            &["`key`", declared, "affinity", "TEXT"],
        );
    }
    for declared in ["TEXT", "VARCHAR(255)", "NVARCHAR", "CLOB", "BLOB", ""] {
        let setup = sqlite_table(&format!("{declared} NOT NULL"), keyed);
        sqlite_migrate(&setup).await.expect(declared);
    }
}

/// An `expires_at` column that SQLite gives text or real affinity
/// (declared `TEXT`, `VARCHAR`, `REAL`, `DOUBLE`, ...), as a migration
/// tool of the application's own may declare a deadline: SQLite kept
/// each deadline as text or as a floating-point number, no record read
/// back from it, and every retry of a completed request was answered
/// 500. PostgreSQL refuses an `expires_at` of another type than `bigint`.
#[tokio::test]
async fn a_sqlite_deadline_kept_as_text_or_a_real_is_refused() {
    let table = |declared: &str| {
        format!(
            "CREATE TABLE idempotency_records (
                scope BLOB NOT NULL, key TEXT NOT NULL, fingerprint BLOB NOT NULL,
                lease_token BLOB, expires_at {declared} NOT NULL, record BLOB,
                PRIMARY KEY (scope, key)
            );"
        )
    };
    for declared in ["TEXT", "VARCHAR(20)", "REAL", "DOUBLE PRECISION", "FLOAT"] {
        assert_refused(
            sqlite_migrate(&table(declared)).await,
            &["`expires_at`", declared, "INTEGER"],
        );
    }
    for declared in ["INTEGER", "BIGINT", "NUMERIC", "DATETIME", ""] {
        sqlite_migrate(&table(declared)).await.expect(declared);
    }
}

/// Views of PostgreSQL's catalogs without the columns a server older than
/// 12 lacks, and a `current_setting` answering `version` for
/// `server_version_num`, in the schema `shadow`: ahead of `pg_catalog`
/// on a connection's search path, they stand for an older server's.
fn older_catalogs(shadow: &str, version: u32, index_columns: &str) -> String {
    format!(
        "CREATE SCHEMA {shadow};
         CREATE VIEW {shadow}.pg_attribute AS
             SELECT attrelid, attname, atttypid, atttypmod, attnum, attisdropped, attnotnull,
                    atthasdef, attidentity, attcollation
             FROM pg_catalog.pg_attribute;
         CREATE VIEW {shadow}.pg_collation AS SELECT oid, collname FROM pg_catalog.pg_collation;
         CREATE VIEW {shadow}.pg_index AS
             SELECT indexrelid, indrelid, indisunique, indisexclusion, indimmediate, indisvalid, indpred,
                    indkey, indcollation, indexprs, {index_columns}
             FROM pg_catalog.pg_index;
         CREATE FUNCTION {shadow}.current_setting(text) RETURNS text LANGUAGE sql AS
             $$ SELECT CASE WHEN $1 = 'server_version_num' THEN '{version}'
                            ELSE pg_catalog.current_setting($1) END $$;"
    )
}

/// What `migrate` answers on the table `setup` creates, seen through
/// [`older_catalogs`] (`version`, `index_columns`); run as the owner, or
/// as a role of its own that may use the table and not create one, when
/// `as_user` says so.
async fn migrate_on_older_catalogs(
    setup: &str,
    (version, index_columns): (u32, &str),
    as_user: bool,
) -> Option<Result<(), StoreError>> {
    let url = backend_url("IDEMPOTENT_TEST_POSTGRES_URL")?;
    let (table, shadow) = (unique_name("idem_table"), unique_name("idem_old"));
    let role = unique_name("idem_user");
    let admin = PostgresStore::connect(&url).await.expect("connect");
    let mut setup =
        older_catalogs(&shadow, version, index_columns) + &setup.replace("{table}", &table);
    setup += &format!(
        "CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA {shadow} TO {role};
         GRANT SELECT ON ALL TABLES IN SCHEMA {shadow} TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role};"
    );
    sqlx::raw_sql(&setup)
        .execute(admin.pool())
        .await
        .expect("setup");
    let mut options: sqlx::postgres::PgConnectOptions = url.parse().expect("a URL");
    if as_user {
        options = options.username(&role);
    }
    let search_path = format!("{shadow},pg_catalog,public");
    let options = options.options([("search_path", search_path.as_str())]);
    let old = PostgresStore::connect_with(options).await.expect("connect");
    let old = PostgresStore::builder(old.pool().clone())
        .table(&table)
        .build()
        .expect("valid table name");
    let migrated = old.migrate().await;
    old.pool().close().await;
    let teardown = format!(
        "DROP TABLE {table}; DROP SCHEMA {shadow} CASCADE; DROP OWNED BY {role}; DROP ROLE {role};"
    );
    sqlx::raw_sql(&teardown)
        .execute(admin.pool())
        .await
        .expect("drop");
    Some(migrated)
}

/// PostgreSQL 11 has no `attgenerated` nor `collisdeterministic`: the
/// look at the table failed on it, `migrate` went on without a check, and
/// took a table with a unique index on `key` alone, whose records of two
/// callers then collided, answered 503.
#[tokio::test]
async fn a_postgres_11_server_has_its_table_checked() {
    let setup = postgres_with_index("", "(key)");
    let catalogs = (110_000, "indnatts, indnkeyatts");
    let Some(migrated) = migrate_on_older_catalogs(&setup, catalogs, false).await else {
        return;
    };
    assert_refused(migrated, &["_extra`", "unique index"]);
}

/// A look at the table that fails (here, catalogs that claim 11 and lack
/// `indnkeyatts`) is told as such: `migrate` went on without a check as
/// the owner, and blamed a missing `CREATE` as a role without it.
#[tokio::test]
async fn a_failed_look_at_the_postgres_table_is_told_as_such() {
    let setup = format!(
        "{} ALTER TABLE {{table}} ADD PRIMARY KEY (scope, key);",
        postgres_table("{table}", "text", "")
    );
    for as_user in [false, true] {
        let catalogs = (110_000, "indnatts");
        let Some(migrated) = migrate_on_older_catalogs(&setup, catalogs, as_user).await else {
            return;
        };
        let told = (migrated.as_ref().err()).map(ToString::to_string);
        assert_refused(migrated, &["could not inspect the table", "indnkeyatts"]);
        let told = told.unwrap_or_default();
        assert!(!told.contains("may not create"), "{told}");
    }
}
