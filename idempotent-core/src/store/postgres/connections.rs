//! Connections the store keeps checked out of its pool between statements.
//!
//! sqlx pings every connection that goes back to its pool (a Sync /
//! ReadyForQuery round trip, whatever `test_before_acquire` says), so a
//! first execution, two statements, would cost four round trips instead of
//! two. Against the same SQL driven by pgbench, that ping cost the store a
//! quarter of its throughput (see BENCHMARKS.md). The store therefore keeps
//! some of the connections it took from the pool in a small pool of its
//! own (deadpool; its statements wait their turn there, in order) and
//! hands a connection that finished its statement cleanly straight to the
//! next statement. The rest of the sqlx pool stays free for everything
//! else.
//!
//! Only a clean finish keeps a connection: one whose statement failed, or
//! whose future was dropped mid-statement (a timeout, a client gone), goes
//! back to the sqlx pool, whose ping drains or discards it; one whose
//! server took no more of its statements (read-only after a failover, or
//! shutting down) is closed instead, as the ping would keep it; after a
//! read-only refusal, so is every connection idle at the time, opened
//! before the failover as that one was (see [`Connections::close_idle`]).
//! Kept connections go back to the sqlx pool as the `kept` module says.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

use super::reachability::{AcquireError, Patience, Reachability};
use crate::record::LogId;
use crate::store::kept::{Checked, Kept};
use crate::store::{Explained, StoreError, sql};

/// The store's connections: kept ones, or straight from the sqlx pool.
pub(super) struct Connections {
    pool: PgPool,
    /// Whether the server takes new connections.
    reachability: Arc<Reachability>,
    /// Undos running on tasks of their own, for [`Connections::settle`].
    undos: TaskTracker,
    /// `None` when connections are not kept (or deadpool refused its
    /// settings, which cannot happen without timeouts).
    kept: Option<Arc<Kept<Checkout>>>,
    /// The store's table, as configured, which statement errors name.
    table: String,
    /// Whether the store has warned that the server lost statements it
    /// had prepared (see [`Connections::warn_once_if_statements_lost`]).
    told_statements_lost: AtomicBool,
}

/// deadpool's manager: its objects are connections checked out of the
/// sqlx pool.
struct Checkout {
    pool: PgPool,
    reachability: Arc<Reachability>,
}

/// A connection lent to one statement; see [`Lease::finish`].
pub(super) struct Lease<'a> {
    /// `None` once finished.
    leased: Option<Leased>,
    pool: &'a PgPool,
    /// Where an undo's task is tracked.
    undos: &'a TaskTracker,
    undo: Option<Undo<'a>>,
    /// The store's table, which a failed statement's error names.
    table: &'a str,
}

/// A token-fenced statement, `(scope, key, token)`, that undoes a claim
/// whose caller stopped waiting for its answer (the engine's store
/// timeout): the server still runs a statement it was sent, and the key
/// would then be held by a lease nobody has until it lapses, answering
/// 409 to retries of a request that was told nothing ran.
#[derive(Clone, Copy)]
pub(super) struct Undo<'a> {
    pub(super) statement: &'a str,
    pub(super) scope: &'a [u8],
    pub(super) key: &'a str,
    pub(super) token: [u8; 16],
    /// The key's form for logs: never `key` itself.
    pub(super) log_id: LogId<'a>,
}

enum Leased {
    Kept(Object<Checkout>),
    Pooled(PoolConnection<Postgres>),
}

impl Connections {
    /// Connections from `pool`, keeping up to `hold` of them (default:
    /// half the pool; at most all but one); `0` returns each one to the
    /// pool after its statement, as sqlx does by itself. Their statements
    /// run on `table`.
    pub(super) fn new(pool: PgPool, hold: Option<u32>, table: &str) -> Self {
        let size = pool.options().get_max_connections();
        // Half, rounded down: kept, the one connection of a pool of one
        // would leave none to the application while statements keep it
        // busy (it goes back only after a second unused). All but one at
        // most, whatever was asked: under steady traffic no kept
        // connection sits unused for a second, and with every one kept,
        // the application's queries, purges and migrations would wait
        // out the pool's acquire timeout and fail.
        let hold = hold.unwrap_or(size / 2).min(size.saturating_sub(1));
        let reachability = Arc::new(Reachability::new());
        let kept = Kept::new(checkout(&pool, &reachability), hold).map(Arc::new);
        Self {
            pool,
            reachability,
            undos: TaskTracker::new(),
            kept,
            table: table.to_owned(),
            told_statements_lost: AtomicBool::new(false),
        }
    }

    /// Warns, the first time only, when `error` says the server lost
    /// statements the store had prepared on a connection (SQLSTATE 26000,
    /// 42P05). The statement runs again on another connection, and most
    /// often succeeds there: without a word, behind a pooler in
    /// transaction mode, which loses them now and then for as long as it
    /// is so set up, the operator would learn of it only from the 503s of
    /// the statements that meet it twice in a row.
    pub(super) fn warn_once_if_statements_lost(&self, error: &sqlx::Error) {
        let lost = matches!(sql::error_code(error).as_deref(), Some("26000" | "42P05"));
        if !lost || self.told_statements_lost.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(%error, table = self.table, "{STATEMENTS_LOST}");
    }

    /// Waits for the undos of abandoned statements to finish.
    pub(super) async fn settle(&self) {
        crate::store::settle(&self.undos).await;
    }

    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection for one statement: a kept one if any is free. While
    /// the server takes no new connections, a statement that needs one
    /// waits for it as `patience` says (see [`Reachability`]).
    pub(super) async fn lease(&self, patience: Patience) -> Result<Lease<'_>, StoreError> {
        let lease = |leased| Lease {
            leased: Some(leased),
            pool: &self.pool,
            undos: &self.undos,
            undo: None,
            table: &self.table,
        };
        let pooled = || self.reachability.acquire(&self.pool, patience);
        let Some(kept) = &self.kept else {
            return Ok(lease(Leased::Pooled(pooled().await?)));
        };
        Kept::start_sweeping(kept, &self.pool);
        let mut object = match kept.pool.get().await {
            Ok(object) => object,
            // Kept connections are opened failing fast: a statement that
            // waits takes one from the pool when the server is back.
            Err(managed::PoolError::Backend(AcquireError::Unreachable(_)))
                if patience == Patience::WaitForServer =>
            {
                return Ok(lease(Leased::Pooled(pooled().await?)));
            }
            Err(managed::PoolError::Backend(error)) => return Err(error.into()),
            Err(other) => return Err(StoreError::backend(other.to_string())),
        };
        // Set back by `finish`: a lease dropped before then is not reused.
        object.clean = false;
        Ok(lease(Leased::Kept(object)))
    }

    /// Closes every connection idle now, kept or in the sqlx pool, once one
    /// has met a server that takes no writes (see [`close_if_stale`]):
    /// they were opened before the failover as that one was, most likely
    /// to the same server, and each would fail the next statement it
    /// served; so would each that prepared a statement whose result type
    /// an `ALTER TABLE` changed since. A statement run again after that meets a new connection,
    /// unless another statement has just finished cleanly on one, which
    /// then took writes. Connections in use are closed as their
    /// statements fail.
    pub(super) fn close_idle(&self) {
        if let Some(kept) = &self.kept {
            for mut idle in kept.pool.retain(|_, _| false).removed {
                idle.connection.close_on_drop();
            }
        }
        // `try_acquire` takes only idle connections, never opens one.
        for _ in 0..self.pool.num_idle() {
            let Some(mut idle) = self.pool.try_acquire() else {
                break;
            };
            idle.close_on_drop();
        }
    }
}

/// The manager that checks connections out of `pool` for [`Kept`].
fn checkout(pool: &PgPool, reachability: &Arc<Reachability>) -> Checkout {
    Checkout {
        pool: pool.clone(),
        reachability: Arc::clone(reachability),
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        Kept::drop_outside_runtime(&mut self.kept);
    }
}

impl managed::Manager for Checkout {
    type Type = Checked<PoolConnection<Postgres>>;
    type Error = AcquireError;

    async fn create(&self) -> Result<Self::Type, AcquireError> {
        // deadpool cannot say which statement this is for.
        let patience = Patience::FailFast;
        let connection = self.reachability.acquire(&self.pool, patience).await?;
        Ok(Checked::new(connection))
    }

    async fn recycle(
        &self,
        checked: &mut Self::Type,
        metrics: &Metrics,
    ) -> RecycleResult<AcquireError> {
        // The sqlx pool drains or discards an unfinished one refused.
        checked.recycle(metrics)
    }
}

impl<'a> Lease<'a> {
    /// Runs `undo` if the lease is dropped before [`finish`](Self::finish),
    /// on the same connection, so that the server runs it after the
    /// abandoned statement.
    pub(super) fn undo_if_abandoned(&mut self, undo: Undo<'a>) {
        self.undo = Some(undo);
    }

    /// The connection, for one statement.
    pub(super) fn connection(&mut self) -> &mut PgConnection {
        match self.leased.as_mut() {
            Some(Leased::Kept(object)) => &mut object.connection,
            Some(Leased::Pooled(connection)) => connection,
            None => unreachable!("a lease keeps its connection until it is finished"),
        }
    }

    /// Ends the lease with the statement's outcome: a success keeps the
    /// connection for the next statement, a failure returns it to the sqlx
    /// pool (or closes it, see [`close_if_stale`]).
    pub(super) fn finish<T>(mut self, outcome: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        self.undo = None;
        match (self.leased.take(), outcome) {
            (Some(Leased::Kept(mut object)), Ok(value)) => {
                object.clean = true;
                Ok(value)
            }
            (_, Ok(value)) => Ok(value),
            (Some(leased), Err(error)) => {
                // Out of the kept ones at once; dropping it returns it to
                // the sqlx pool, or closes it if it must not serve again.
                let mut connection = match leased {
                    Leased::Kept(object) => Object::take(object).connection,
                    Leased::Pooled(connection) => connection,
                };
                close_if_stale(&mut connection, &error);
                Err(statement_error(error, self.table))
            }
            (None, Err(error)) => Err(statement_error(error, self.table)),
        }
    }
}

/// Marks `connection` to be closed when dropped, rather than returned to
/// the sqlx pool, if `error` says its server takes no more of the store's
/// statements: a read-only transaction (SQLSTATE 25006), as on the old
/// primary of a failover that came back as a standby, or a server shutting
/// the session down (57P01 to 57P03). Returned, such a connection would
/// pass the pool's ping and fail every statement until its lifetime ends
/// (30 minutes by default), while new connections would reach the new
/// primary that the name or proxy the store connects through points to.
/// So is one whose prepared statements no longer match the server (see
/// [`is_stale_statement`]), which fail the same way for as long.
pub(in crate::store) fn close_if_stale(
    connection: &mut PoolConnection<Postgres>,
    error: &sqlx::Error,
) {
    let code = sql::error_code(error);
    if matches!(code.as_deref(), Some("25006" | "57P01" | "57P02" | "57P03"))
        || is_stale_statement(error)
    {
        connection.close_on_drop();
    }
}

/// Whether the server refused a statement the connection had prepared
/// (sqlx prepares each one once per connection, and keeps it): its
/// plan's result columns changed type since, as an `ALTER TABLE ...
/// TYPE` of the store's table makes them ("cached plan must not change
/// result type", SQLSTATE 0A000, feature not supported, which the
/// store's statements do not meet otherwise on a table `migrate` made);
/// or the server no longer has it (26000), or already
/// has one of its name (42P05), as when something ran `DISCARD ALL` or
/// `DEALLOCATE` on the connection, or a pooler hands each transaction
/// another server connection. The server answers each such statement
/// this way for as long as the connection lasts, and applies none of it;
/// on a new connection it is prepared afresh.
pub(in crate::store) fn is_stale_statement(error: &sqlx::Error) -> bool {
    matches!(
        sql::error_code(error).as_deref(),
        Some("0A000" | "26000" | "42P05")
    )
}

/// A statement's failure as the engine reports it. A table that is
/// missing, of another shape (made by something else, or altered since
/// `migrate` made it), refusing the store's rows, or closed to the
/// store's role is named as such, with the fix: a service set up so fails
/// every request, and the log line is all its operator has to go on. A
/// server that takes no writes is named too, but as an outage: during a
/// failover the store reaches the old primary, now a standby, until the
/// name or proxy it connects through follows the new one (`migrate`
/// refuses a standby or a read-only role at the service's start). So are
/// prepared statements the server lost, which a new connection prepares
/// again.
pub(in crate::store) fn statement_error(error: sqlx::Error, table: &str) -> StoreError {
    let hint = match sql::error_code(&error).as_deref() {
        Some("42P01") => table_missing(table),
        // Undefined column, no operator for the column's type, datatype
        // mismatch, no unique index for the claim's `ON CONFLICT`: the
        // table has another shape than the store's.
        Some("42703" | "42883" | "42804" | "42P10") => reshaped(table),
        // A NOT NULL, foreign key, unique, CHECK or exclusion constraint
        // violated, a value too long or out of range for its column: no
        // row the store writes has such a value unless the table was
        // changed, and every row it writes then fails alike.
        Some("23502" | "23503" | "23505" | "23514" | "23P01" | "22001" | "22003") => {
            refusing(table)
        }
        Some("42501") => NOT_PERMITTED.to_owned(),
        Some("25006") => return Explained::store_error(error, READ_ONLY),
        Some("26000" | "42P05") => return Explained::store_error(error, STATEMENTS_LOST),
        // Query cancelled (`statement_timeout`, `pg_cancel_backend`), lock
        // not available (`lock_timeout`).
        Some("57014" | "55P03") => return Explained::store_error(error, CANCELLED),
        _ => return StoreError::backend(error),
    };
    Explained::misconfigured(error, hint)
}

/// What to do about the missing table `table` (SQLSTATE 42P01).
fn table_missing(table: &str) -> String {
    format!(
        "the table `{table}` does not exist (never created, or dropped or renamed since): create it with `PostgresStore::migrate()` when the service starts, or with the SQL of `PostgresStore::migration_sql(\"{table}\")`; a table of that name in another schema is found only through the role's `search_path`, or when the store is given its schema (`schema.table`)"
    )
}

/// What to do about the table `table` of another shape than the store's.
fn reshaped(table: &str) -> String {
    format!(
        "the table `{table}` does not have the columns, types and primary key `PostgresStore::migrate()` creates (altered since, or a table of the same name made by something else?): `PostgresStore::migrate()` names what differs; give it back the shape of `PostgresStore::migration_sql(\"{table}\")`, or give the store a table of its own with `PostgresStoreBuilder::table(...)`"
    )
}

/// What to do about the table `table` refusing every row of a kind the
/// store writes.
fn refusing(table: &str) -> String {
    format!(
        "the table `{table}` refuses the store's rows, as none made by `PostgresStore::migrate()` does: a column, constraint or index was added or changed since (a NOT NULL column without a default, a CHECK, a foreign key, a unique index other than on (`scope`, `key`), an exclusion constraint, or a column type narrower than the store's); drop it, give the column a default, or give the column back its type in `PostgresStore::migration_sql(\"{table}\")`"
    )
}

/// What to do about a table the role may not use (SQLSTATE 42501): the
/// server's words say whether the table or its schema refused it.
const NOT_PERMITTED: &str = "grant SELECT, INSERT, UPDATE and DELETE on the store's table to the role the store connects as, and USAGE on the table's schema if it is not `public` (`PostgresStore::migrate()` names what the role lacks)";
/// What to do about a server that takes no writes (SQLSTATE 25006).
const READ_ONLY: &str = "the server runs the store's statements read-only (a hot standby, as the old primary is during a failover, or `default_transaction_read_only = on` for the role, its database or the server): if it lasts, connect the store to the primary, or turn `default_transaction_read_only` off for the store's role";
/// What to do about a statement the server cancelled (SQLSTATE 57014,
/// 55P03), which applied none of it: the server's words say only which
/// timeout ran out, not what the statement waited for or where the
/// timeout is set.
const CANCELLED: &str = "PostgreSQL cancelled the statement, which applied none of it: `statement_timeout` or `lock_timeout` (set for the store's role, its database, the server, or in the connection options) ran out, most likely while it waited for a lock on the store's table that another connection held (a migration's `ALTER TABLE`, a `VACUUM FULL`, `LOCK TABLE`, a long transaction that wrote the same key), or someone cancelled it (`pg_cancel_backend`); if it lasts, end what holds the lock (`pg_locks`, `pg_stat_activity`), or raise the timeout for the store's role (`ALTER ROLE ... SET statement_timeout = ...`)";
/// What to do about prepared statements the server lost (SQLSTATE 26000,
/// 42P05), which a new connection prepares again.
const STATEMENTS_LOST: &str = "the server lost the statements the store had prepared on its connection: something ran `DISCARD ALL` or `DEALLOCATE` on a connection of the store's pool, or a pooler between them hands each transaction another server connection (PgBouncer with `pool_mode = transaction`); if it lasts, connect the store directly or through session pooling, or through PgBouncer 1.21 or later with `max_prepared_statements` set";

impl Drop for Lease<'_> {
    /// A lease dropped before its statement finished, with an undo: the
    /// connection leaves the kept ones, and a task runs the undo on it
    /// (after the abandoned statement's answer, which sqlx reads first),
    /// then returns it to the sqlx pool.
    fn drop(&mut self) {
        let (Some(leased), Some(undo)) = (self.leased.take(), self.undo.take()) else {
            return;
        };
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        let connection = match leased {
            Leased::Kept(object) => Object::take(object).connection,
            Leased::Pooled(connection) => connection,
        };
        let owned = OwnedUndo {
            statement: undo.statement.to_owned(),
            scope: undo.scope.to_vec(),
            key: undo.key.to_owned(),
            token: undo.token,
            log_id: undo.log_id.to_string(),
        };
        self.undos
            .spawn_on(owned.run(connection, self.pool.clone()), &runtime);
    }
}

/// An [`Undo`] for a task of its own.
struct OwnedUndo {
    statement: String,
    scope: Vec<u8>,
    key: String,
    token: [u8; 16],
    log_id: String,
}

impl OwnedUndo {
    async fn run(self, mut connection: PoolConnection<Postgres>, pool: PgPool) {
        let Err(error) = self.execute(&mut connection).await else {
            return;
        };
        // That connection broke, or its server takes no writes: try once
        // more on another.
        close_if_stale(&mut connection, &error);
        drop(connection);
        let released = match pool.acquire().await {
            Ok(mut connection) => {
                let released = self.execute(&mut connection).await;
                if let Err(error) = &released {
                    close_if_stale(&mut connection, error);
                }
                released
            }
            Err(error) => Err(error),
        };
        if let Err(error) = released {
            tracing::warn!(%error, key = self.log_id, "could not release a claim whose answer nobody read; it frees when its lease lapses");
        }
    }

    async fn execute(&self, connection: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(&self.statement)
            .bind(self.scope.as_slice())
            .bind(self.key.as_str())
            .bind(self.token.as_slice())
            .execute(connection)
            .await
            .map(drop)
    }
}
