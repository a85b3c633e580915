//! What the SQL stores (PostgreSQL, SQLite) share: table-name checks, time
//! conversion, reading stored ids back and the background purge.

use std::borrow::Cow;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{EXPIRY_GRACE, StoreError};
use crate::clock::millis;
use crate::fingerprint::Fingerprint;
use crate::record::{CodecError, InFlight, LeaseToken, Record};

/// The code the database gave `error` (PostgreSQL's SQLSTATE, SQLite's
/// extended result code), if the database gave one.
pub(crate) fn error_code(error: &sqlx::Error) -> Option<Cow<'_, str>> {
    error.as_database_error()?.code()
}

/// The table stores create when none is named.
pub(crate) const DEFAULT_TABLE: &str = "idempotency_records";

/// How often a claim that lost a race to a concurrent change of its
/// record (a claim committed after it looked, a record released or
/// expired in between) looks again before giving up.
pub(crate) const CLAIM_ATTEMPTS: usize = 8;

/// Rows deleted per statement by the stores' `purge_expired`, so a large
/// backlog never holds many row locks (PostgreSQL) or the database's one
/// write lock (SQLite) for long.
pub(crate) const PURGE_BATCH: i64 = 1000;

/// The deadlines a purge at `now` (Unix ms) deletes up to, as SQL
/// `bigint`s: a completed record's, and a claim's, whose lease must have
/// lapsed at least [`EXPIRY_GRACE`] ago.
pub(crate) fn purge_deadlines(now: u64) -> (i64, i64) {
    let claims = now.saturating_sub(millis(EXPIRY_GRACE));
    (to_sql_millis(now), to_sql_millis(claims))
}

/// Runs `batch`, one `DELETE` of at most [`PURGE_BATCH`] expired rows,
/// until one deletes fewer, and answers how many rows went in all.
pub(crate) async fn purge_in_batches<B, F>(mut batch: B) -> Result<u64, StoreError>
where
    B: FnMut() -> F,
    F: Future<Output = Result<u64, StoreError>>,
{
    let mut purged = 0;
    loop {
        let deleted = batch().await?;
        purged += deleted;
        if deleted < PURGE_BATCH.unsigned_abs() {
            return Ok(purged);
        }
    }
}

/// A background task purging expired records, from
/// `PostgresStore::spawn_reaper` or `SqliteStore::spawn_reaper`; keep it
/// for as long as the service runs.
///
/// Dropped, it stops at once, cutting short a purge under way. That loses
/// nothing: each batch of a purge is one `DELETE` of expired rows, which
/// the database applies whole or not at all, claims already treat the expired rows left behind as absent, and the next
/// purge deletes them. [`shutdown`](Self::shutdown) is for a service that
/// must know the reaper is done, say before it closes the pool: it lets
/// the purge under way finish, then stops.
///
// The example needs `PostgresStore`, which only the `postgres` feature brings.
#[cfg_attr(feature = "postgres", doc = "```no_run")]
#[cfg_attr(not(feature = "postgres"), doc = "```ignore")]
/// # async fn run(store: idempotent_core::store::PostgresStore) {
/// let reaper = store.spawn_reaper(std::time::Duration::from_secs(60));
/// // ... serve, then `Idempotency::drain` ...
/// reaper.shutdown().await; // no purge runs from here on
/// store.pool().close().await;
/// # }
/// ```
#[derive(Debug)]
#[must_use = "the reaper stops when dropped"]
pub struct Reaper {
    /// `None` once [`shutdown`](Self::shutdown) took it to await it.
    task: Option<tokio::task::JoinHandle<()>>,
    /// Asks the task to stop before its next purge.
    stop: CancellationToken,
}

impl Reaper {
    /// Stops the reaper once the purge under way, if any, has finished
    /// (every batch of it), and returns when its task has ended: no purge
    /// of this reaper runs after that, and the pooled connection it used
    /// is free. Dropping the returned future before it ends stops the
    /// reaper at once, as dropping the reaper does: a shutdown in a hurry
    /// bounds the wait with `tokio::time::timeout(limit, reaper.shutdown())`.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let Some(task) = self.task.as_mut() else {
            return;
        };
        // A task that panicked or was aborted has stopped too. Awaited in
        // place, so that a shutdown future dropped midway leaves the task
        // in `self`, aborted on drop.
        let _ended = task.await;
        self.task = None;
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A store whose expired records a [`Reaper`] purges.
pub(crate) trait Purge: Clone + Send + Sync + 'static {
    /// Deletes the expired records; answers how many.
    fn purge_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Runs `store`'s purge every `period` (at least a millisecond) on a
/// background task until the returned [`Reaper`] is dropped or shut down,
/// logging each outcome: a failure is retried on the next tick.
///
/// # Panics
/// Called outside a Tokio runtime, which the task is spawned on.
pub(crate) fn spawn_reaper(store: impl Purge, period: Duration) -> Reaper {
    // A zero period would panic the ticker inside the task, leaving a
    // reaper that looks alive and never purges.
    let period = period.max(Duration::from_millis(1));
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Only the wait between purges listens for the stop: a purge,
            // once begun, runs to its end. A stop asked for as a tick falls
            // due wins, so no purge starts after `shutdown` was called.
            tokio::select! {
                biased;
                () = stopped.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match Purge::purge_expired(&store).await {
                Ok(purged) => tracing::debug!(purged, "purged expired idempotency records"),
                Err(error) => {
                    tracing::warn!(%error, "could not purge expired idempotency records");
                }
            }
        }
    });
    Reaper {
        task: Some(task),
        stop,
    }
}

/// A claim kept losing races to concurrent changes of its record.
#[derive(Debug, thiserror::Error)]
#[error("the idempotency record kept changing while it was being claimed")]
pub(crate) struct Contended;

/// The store's table exists but lacks columns, or has them with other
/// types: a table of the same name made by something else, which `CREATE
/// TABLE IF NOT EXISTS` kept.
#[derive(Debug, thiserror::Error)]
#[error(
    "the table `{table}` was not created by this store ({problems}): give the store a table of its own with `{store}Builder::table(...)`, or drop this one and run `{store}::migrate()` again"
)]
struct ForeignTable {
    table: String,
    problems: String,
    /// The store's type name, as `PostgresStore`.
    store: &'static str,
}

/// Refuses the table `table` of `store` (its type name, as
/// `PostgresStore`) when its `found` columns, `(name, type)`, are not the
/// `expected` ones (see [`column_problems`]): every statement would fail
/// on it. No columns: no table, for the migration to create or to say
/// why not.
pub(crate) fn check_columns(
    table: &str,
    found: &[(String, String)],
    (expected, types): (&[(&str, &str)], bool),
    store: &'static str,
) -> Result<(), StoreError> {
    if found.is_empty() {
        return Ok(());
    }
    match column_problems(found, expected, types) {
        None => Ok(()),
        Some(problems) => Err(foreign_table(table, problems, store)),
    }
}

/// What is wrong with a table of the store's columns that has no primary
/// key or unique index on exactly `(scope, key)`, as a table made by a
/// migration tool with a surrogate `id` key has: every claim's `ON
/// CONFLICT (scope, key)` fails on it.
const NOT_KEYED: &str = "no primary key or unique index on exactly (`scope`, `key`), which every claim's `INSERT ... ON CONFLICT (scope, key)` needs";

/// The error for the table `table` of `store` (its type name, as
/// `SqliteStore`), made by something else, with `problems`.
pub(crate) fn foreign_table(table: &str, problems: String, store: &'static str) -> StoreError {
    StoreError::misconfigured(ForeignTable {
        table: table.to_owned(),
        problems,
        store,
    })
}

/// Refuses the table `table` of `store` (see [`check_columns`]) unless
/// `keyed` says it has a primary key or unique index on exactly `(scope,
/// key)`.
pub(crate) fn check_key(table: &str, keyed: bool, store: &'static str) -> Result<(), StoreError> {
    if keyed {
        return Ok(());
    }
    Err(foreign_table(table, NOT_KEYED.to_owned(), store))
}

/// The columns every row the store writes has a value in: any other
/// column is left empty (NULL) by a claim, or emptied once the response
/// is stored (`lease_token`).
const FILLED: [&str; 4] = ["scope", "key", "fingerprint", "expires_at"];

/// Refuses the table `table` of `store` (see [`check_columns`]) when one
/// of its `required` columns (`NOT NULL` without a default, nor a value
/// the database makes) is one the store leaves empty: every claim's
/// `INSERT`, or every stored response, would fail on it, a 503 for good.
pub(crate) fn check_required(
    table: &str,
    required: &[String],
    store: &'static str,
) -> Result<(), StoreError> {
    let left_empty: Vec<String> = required
        .iter()
        .filter(|name| {
            !FILLED
                .iter()
                .any(|filled| filled.eq_ignore_ascii_case(name))
        })
        .map(|name| format!("`{name}`"))
        .collect();
    if left_empty.is_empty() {
        return Ok(());
    }
    let problems = format!(
        "NOT NULL without a default: {}, which the store leaves empty in its rows, so every claim or every stored response would fail; let it be NULL or give it a default",
        left_empty.join(", ")
    );
    Err(foreign_table(table, problems, store))
}

/// Refuses the table `table` of `store` (see [`check_columns`]) when its
/// `key` column, or a unique index on it, compares keys by `collation`
/// rather than byte for byte: keys that differ only in case (`abc`,
/// `ABC`) or trailing spaces can then be one, and one request would be
/// answered with the response stored for the other, or refused while the
/// other's record lives.
pub(crate) fn check_key_collation(
    table: &str,
    collation: Option<&str>,
    store: &'static str,
) -> Result<(), StoreError> {
    let Some(collation) = collation else {
        return Ok(());
    };
    let problems = format!(
        "`key` is compared by {collation}, under which keys that differ in case (`abc`, `ABC`) or spaces can be equal: one request would be answered with the response stored for another; keys are compared byte for byte, so drop the `COLLATE` from the column and its unique index"
    );
    Err(foreign_table(table, problems, store))
}

/// Refuses the table `table` of `store` (see [`check_columns`]) when it
/// has the unique index `colliding` (or the index of a unique or
/// exclusion constraint of that name): one that uses the store's columns
/// alone (as keys, in expressions or in its predicate; a column of the
/// user's own is filled as the user decides), whose keys are not both
/// `scope` and `key`, nor `lease_token` (random, one claim's own, and
/// emptied to NULL, which is distinct from NULL unless the index says
/// `NULLS NOT DISTINCT`): on `key` alone, on an expression of it, or on
/// `fingerprint`, two records can collide, and a claim that meets
/// another record there fails, answered 503, for as long as that record
/// is kept.
pub(crate) fn check_unique_indexes(
    table: &str,
    colliding: Option<&str>,
    store: &'static str,
) -> Result<(), StoreError> {
    let Some(index) = colliding else {
        return Ok(());
    };
    let problems = format!(
        "the unique index or constraint `{index}` is not over both `scope` and `key`: records of two callers, or of two keys, can collide on it, and every claim that meets another record there fails; drop it (with `ALTER TABLE ... DROP CONSTRAINT` if a constraint made it)"
    );
    Err(foreign_table(table, problems, store))
}

/// What is wrong with a table's `(name, type)` columns next to the
/// `expected` ones, if anything: missing columns and, where `types`
/// says types matter, columns of another type.
fn column_problems(
    found: &[(String, String)],
    expected: &[(&str, &str)],
    types: bool,
) -> Option<String> {
    let problems: Vec<String> = expected
        .iter()
        .filter_map(|&(name, kind)| {
            match found
                .iter()
                .find(|(found, _)| found.eq_ignore_ascii_case(name))
            {
                None => Some(format!("no column `{name}`")),
                Some((_, actual)) if types && !actual.eq_ignore_ascii_case(kind) => {
                    Some(format!("`{name}` is {actual}, not {kind}"))
                }
                Some(_) => None,
            }
        })
        .collect();
    (!problems.is_empty()).then(|| problems.join(", "))
}

/// A table name the SQL stores refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table name `{name}`: {rule}")]
pub struct InvalidTableName {
    name: String,
    rule: &'static str,
}

/// Table names are spliced into SQL text (they cannot be bound as
/// parameters), so only plain identifiers are accepted.
const NOT_AN_IDENTIFIER: &str = "use 1 to 63 ASCII letters, digits or underscores, not starting with a digit, optionally prefixed by a schema name and a dot";

/// A temporary table exists only for the connection that created it, and
/// only while that connection lasts: the store's other connections would
/// find no table, and every record would go with the one that has it.
const IN_A_TEMPORARY_SCHEMA: &str =
    "a temporary schema's tables are each connection's own; name a schema of the database";

/// Checks that `name` is a plain identifier, optionally schema-qualified,
/// and not in a schema that `is_temporary` says holds each connection's
/// own tables.
pub(crate) fn check_table_name(
    name: &str,
    is_temporary: fn(&str) -> bool,
) -> Result<(), InvalidTableName> {
    let refuse = |rule| {
        Err(InvalidTableName {
            name: name.to_owned(),
            rule,
        })
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|part| is_identifier(part)) {
        return refuse(NOT_AN_IDENTIFIER);
    }
    if parts.len() == 2 && is_temporary(&parts[0].to_ascii_lowercase()) {
        return refuse(IN_A_TEMPORARY_SCHEMA);
    }
    Ok(())
}

fn is_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    let starts_well = chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
    starts_well && part.len() <= 63 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `name` as it goes into SQL text: each part (schema, table) in double
/// quotes, so that a reserved word such as `order` or `user` is read as a
/// name. Folded to lower case first, as PostgreSQL folds a name written
/// without quotes, so that `Records` still means the table `records` that
/// an unquoted statement created for it (SQLite ignores the case of names
/// either way). `name` has passed [`check_table_name`]: no part holds a
/// quote.
pub(crate) fn quoted(name: &str) -> String {
    let parts: Vec<String> = name
        .split('.')
        .map(|part| format!("\"{}\"", part.to_ascii_lowercase()))
        .collect();
    parts.join(".")
}

/// The unqualified part of a table name, for naming its index.
pub(crate) fn base_name(table: &str) -> &str {
    table.rsplit('.').next().unwrap_or(table)
}

/// Unix milliseconds as SQL `bigint`; far-future times saturate.
pub(crate) fn to_sql_millis(millis: u64) -> i64 {
    i64::try_from(millis).unwrap_or(i64::MAX)
}

/// SQL `bigint` back to Unix milliseconds.
pub(crate) fn from_sql_millis(millis: i64) -> u64 {
    u64::try_from(millis).unwrap_or(0)
}

/// A row that does not hold a valid record: a codec error, like a value
/// that does not decode, not a failure of the database.
pub(crate) fn corrupt(reason: &'static str) -> StoreError {
    StoreError::Codec(CodecError::new(reason))
}

/// A row of the store's table `table`, of the store `store` (its type
/// name, as `PostgresStore`), whose columns are read as the store writes
/// them.
pub(crate) struct TableRow<'r, R> {
    row: &'r R,
    table: &'r str,
    store: &'static str,
}

impl<'r, R: sqlx::Row> TableRow<'r, R> {
    pub(crate) fn new(row: &'r R, table: &'r str, store: &'static str) -> Self {
        Self { row, table, store }
    }

    /// The column `name`; one that does not read as the store's type is
    /// told with the table (see [`unreadable_column`]).
    pub(crate) fn column<T>(&self, name: &str) -> Result<T, StoreError>
    where
        T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'n> &'n str: sqlx::ColumnIndex<R>,
    {
        (self.row.try_get(name)).map_err(|error| unreadable_column(error, self.table, self.store))
    }
}

/// `error`, from reading a column of a row of the store's table `table`
/// (of `store`, its type name, as `PostgresStore`): a value that does not
/// read as the type the store writes it with is told as an unreadable
/// record, naming the column and the table. Such a value comes from a
/// table altered since `migrate` made it (a column's type changed: every
/// row found then fails alike, a stored response included), or from a
/// row written by something else. Either way the row is a record of a
/// request that ran or runs: failing open would run it again, as for a
/// corrupt record. Any other error is the database's.
fn unreadable_column(error: sqlx::Error, table: &str, store: &'static str) -> StoreError {
    let sqlx::Error::ColumnDecode { index, source } = error else {
        return StoreError::backend(error);
    };
    let column = index.trim_matches('"');
    StoreError::Codec(CodecError::described(format!(
        "the column `{column}` of the table `{table}` does not read as the type the store writes it with ({source}): its type was changed since `{store}::migrate()` made the table (which `{store}::migrate()` names), or the row was written by something else; give the column back its type in `{store}::migration_sql(\"{table}\")`"
    )))
}

pub(crate) fn fingerprint_from(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    let bytes = bytes.try_into().map_err(|_| corrupt("fingerprint"))?;
    Ok(Fingerprint::from_bytes(bytes))
}

pub(crate) fn token_from(bytes: &[u8]) -> Result<LeaseToken, StoreError> {
    let bytes = bytes.try_into().map_err(|_| corrupt("lease token"))?;
    Ok(LeaseToken::from_bytes(bytes))
}

/// The in-flight record of a row without a stored response: its claim,
/// under the lease token `token`, holds the key until `expires_at`. A row
/// without a token is corrupt.
pub(crate) fn in_flight(
    fingerprint: Fingerprint,
    token: Option<Vec<u8>>,
    expires_at: u64,
) -> Result<Record, StoreError> {
    let token = token.ok_or_else(|| corrupt("an in-flight row has no lease token"))?;
    Ok(Record::InFlight(InFlight {
        fingerprint,
        lease_token: token_from(&token)?,
        lease_expires_at: expires_at,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Semaphore;

    use super::*;

    fn never_temporary(_: &str) -> bool {
        false
    }

    #[test]
    fn accepts_plain_and_schema_qualified_names() {
        for name in ["idempotency_records", "_t1", "app.records", "A.b_2"] {
            assert_eq!(check_table_name(name, never_temporary), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_a_temporary_schema_in_any_case() {
        let temporary = |schema: &str| schema == "temp";
        for name in ["temp.records", "TEMP.records", "Temp.records"] {
            let refused = check_table_name(name, temporary).expect_err(name);
            assert!(refused.to_string().contains("temporary"), "{refused}");
        }
        assert_eq!(check_table_name("records", temporary), Ok(()));
    }

    #[test]
    fn rejects_names_that_could_inject_sql() {
        let long = "a".repeat(64);
        for name in [
            "",
            "1abc",
            "records; DROP TABLE x",
            "a.b.c",
            "\"quoted\"",
            "a-b",
            ".a",
            long.as_str(),
        ] {
            assert!(check_table_name(name, never_temporary).is_err(), "{name}");
        }
    }

    #[test]
    fn column_problems_name_missing_columns_and_other_types() {
        let expected = [("scope", "bytea"), ("expires_at", "bigint")];
        let found = |columns: &[(&str, &str)]| -> Vec<(String, String)> {
            columns
                .iter()
                .map(|&(name, kind)| (name.to_owned(), kind.to_owned()))
                .collect()
        };
        let theirs = found(&[("id", "text"), ("expires_at", "timestamp with time zone")]);
        assert_eq!(
            column_problems(&theirs, &expected, true).as_deref(),
            Some("no column `scope`, `expires_at` is timestamp with time zone, not bigint")
        );
        assert_eq!(
            column_problems(&theirs, &expected, false).as_deref(),
            Some("no column `scope`")
        );
        let ours = found(&[
            ("scope", "bytea"),
            ("expires_at", "bigint"),
            ("extra", "int"),
        ]);
        assert_eq!(column_problems(&ours, &expected, true), None);
    }

    #[test]
    fn names_are_quoted_part_by_part_in_lower_case() {
        assert_eq!(quoted("order"), "\"order\"");
        assert_eq!(quoted("App.User_Records"), "\"app\".\"user_records\"");
    }

    #[test]
    fn base_name_drops_the_schema() {
        assert_eq!(base_name("app.records"), "records");
        assert_eq!(base_name("records"), "records");
    }

    /// A purge that counts its starts and ends, and waits for a permit of
    /// `gate` before it ends, failing if `fails`.
    #[derive(Clone, Default)]
    struct Counted {
        started: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
        gate: Option<Arc<Semaphore>>,
        fails: bool,
    }

    impl Purge for Counted {
        async fn purge_expired(&self) -> Result<u64, StoreError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("never closed").forget();
            }
            self.ended.fetch_add(1, Ordering::SeqCst);
            if self.fails {
                return Err(StoreError::backend("down"));
            }
            Ok(0)
        }
    }

    impl Counted {
        /// A purge that waits, before it ends, for permits added to the
        /// gate returned with it.
        fn gated() -> (Self, Arc<Semaphore>) {
            let gate = Arc::new(Semaphore::new(0));
            let purge = Self {
                gate: Some(gate.clone()),
                ..Self::default()
            };
            (purge, gate)
        }

        fn counts(&self) -> (usize, usize) {
            (
                self.started.load(Ordering::SeqCst),
                self.ended.load(Ordering::SeqCst),
            )
        }

        /// Waits until `started` purges have begun: a sleep, so that the
        /// paused clock moves on to the reaper's next tick.
        async fn until_started(&self, started: usize) {
            while self.started.load(Ordering::SeqCst) < started {
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
        }
    }

    /// Between purges, `shutdown` returns at once, and no purge starts
    /// after it, however long the time goes on.
    #[tokio::test(start_paused = true)]
    async fn shutdown_between_purges_returns_and_nothing_runs_after() {
        let purge = Counted::default();
        let reaper = spawn_reaper(purge.clone(), Duration::from_secs(60));
        purge.until_started(1).await;
        reaper.shutdown().await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(purge.counts(), (1, 1));
    }

    /// Asked before its first tick was taken, the reaper purges nothing.
    #[tokio::test(start_paused = true)]
    async fn shutdown_before_the_first_purge_purges_nothing() {
        let purge = Counted::default();
        spawn_reaper(purge.clone(), Duration::from_secs(60))
            .shutdown()
            .await;
        assert_eq!(purge.counts(), (0, 0));
    }

    /// A purge under way finishes before `shutdown` returns, and is the
    /// last one.
    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_the_purge_under_way() {
        let (purge, gate) = Counted::gated();
        let reaper = spawn_reaper(purge.clone(), Duration::from_millis(1));
        purge.until_started(1).await;
        let mut shutdown = tokio::spawn(reaper.shutdown());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!shutdown.is_finished(), "returned with a purge under way");
        gate.add_permits(10);
        (&mut shutdown).await.unwrap();
        assert_eq!(purge.counts(), (1, 1));
    }

    /// Failing purges are retried tick after tick, and `shutdown` still
    /// returns after one.
    #[tokio::test(start_paused = true)]
    async fn failing_purges_are_retried_and_shutdown_returns() {
        let purge = Counted {
            fails: true,
            ..Counted::default()
        };
        let reaper = spawn_reaper(purge.clone(), Duration::from_millis(1));
        purge.until_started(3).await;
        reaper.shutdown().await;
        let (started, ended) = purge.counts();
        assert_eq!(started, ended);
        assert!(started >= 3);
    }

    /// Dropped before it returns, `shutdown` stops the reaper at once, as
    /// dropping the reaper does: the purge under way is cut short.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_dropped_midway_stops_the_reaper_at_once() {
        let (purge, gate) = Counted::gated();
        let reaper = spawn_reaper(purge.clone(), Duration::from_millis(1));
        purge.until_started(1).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(5), reaper.shutdown()).await;
        assert!(gave_up.is_err());
        gate.add_permits(10);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(purge.counts(), (1, 0), "the purge was not cut short");
    }
}
