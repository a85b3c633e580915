//! A PostgreSQL store (feature `postgres`), on sqlx.
//!
//! Every instance of a service that points at the same table shares one
//! set of records, and each operation is a single statement, atomic on the
//! server.
//!
//! # Schema
//!
//! [`PostgresStore::migrate`] creates it (idempotently, under an advisory
//! lock so that instances starting together do not race), or your own
//! migrations, from [`PostgresStore::migration_sql`], with the service's
//! role granted only `SELECT`, `INSERT`, `UPDATE` and `DELETE` on it;
//! shown here with the default table name:
//!
//! ```sql
#![doc = include_str!("postgres/schema.sql")]
//! ```
//!
//! `expires_at` is the one deadline that matters for a row: the lease
//! deadline while in flight, the end of replay once completed. A row whose
//! `expires_at` has passed is free to be claimed again, and is what
//! [`PostgresStore::purge_expired`] deletes (a claim's a minute later, so
//! that its holder may still complete it). Times are Unix milliseconds
//! from the store's [`Clock`], passed as parameters, so the database's own
//! clock is never consulted.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::{Connection, Executor, Row};
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

use self::connections::{Connections, Undo, close_if_stale, is_stale_statement, statement_error};
use self::identifiers::quote_ident;
use self::inspection::{Catalog, Inspected, inspection_sql};
use self::reachability::{Patience, address};

use super::sql::{self, DEFAULT_TABLE, InvalidTableName, Reaper, from_sql_millis, to_sql_millis};
use super::{Explained, Store, StoreError};

/// A row of the store's table, read column by column.
type TableRow<'r> = sql::TableRow<'r, PgRow>;
/// The store's name in what its errors tell to do.
const STORE: &str = "PostgresStore";
use crate::clock::{Clock, SharedClock, SystemClock, millis};
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};

mod connections;
mod identifiers;
mod inspection;
mod reachability;

const SCHEMA: &str = include_str!("postgres/schema.sql");
/// A connection taken from the pool, for a migration.
type Leased = PoolConnection<Postgres>;
/// Room for a completion's values in one protocol message, which the
/// server caps at 1 GiB, less a margin for the rest of the statement.
const MAX_MESSAGE_BYTES: usize = (1 << 30) - (1 << 20);
/// How many more connections a statement is tried on when the one it ran
/// on turns out broken. A database restart, a failover or ended sessions
/// break every pooled connection at once, and none is checked before use
/// (a check would cost a round trip per statement), so the statement
/// goes on to the next until it meets a live one, or a new one. At least
/// this many: see [`broken_connection_retries`].
const BROKEN_CONNECTION_RETRIES: usize = 40;

/// How many more connections a statement on `pool` is tried on when the
/// one it ran on turns out broken: [`BROKEN_CONNECTION_RETRIES`], or the
/// pool's size if larger. A restart breaks every connection the pool
/// opened, kept ones and idle ones alike, and each broken one is
/// discarded as it fails, so the one after as many as the pool holds is
/// a new one. With 40 only, a pool of 100 (keeping its default 50) fails
/// the first claim after a restart on the 41st broken connection, a new
/// one being a few tries away.
fn broken_connection_retries(pool: &PgPool) -> usize {
    let size = pool.options().get_max_connections();
    usize::try_from(size).map_or(usize::MAX, |size| size.max(BROKEN_CONNECTION_RETRIES))
}

/// Whether `error` says the connection broke, rather than that the
/// statement failed on a live one.
fn is_broken_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // Class 08: connection exception; 57P01-57P03: the server shut
        // the session down (`pg_terminate_backend`, a restart, a failover).
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

/// Whether PostgreSQL rolled the statement back because it raced a
/// concurrent one: a serialization failure under `REPEATABLE READ` or
/// `SERIALIZABLE` (a database or role whose
/// `default_transaction_isolation` is one of them), where a claim that
/// meets a row committed after its snapshot, or a write to a row changed
/// since, fails instead of waiting and looking again as under `READ
/// COMMITTED`; or a deadlock. Nothing of it was applied.
fn is_rolled_back_race(error: &sqlx::Error) -> bool {
    matches!(sql::error_code(error).as_deref(), Some("40001" | "40P01"))
}

/// Whether the server refused the statement for what the connection it
/// ran on carries, which a new connection does not: its transactions are
/// read-only (SQLSTATE 25006: the old primary of a failover, now a
/// standby or fenced with `default_transaction_read_only`, which the
/// connection was opened to before the failover), or its prepared
/// statements no longer match the server (see [`is_stale_statement`]).
/// The statement is its own transaction, rolled back with the error:
/// nothing of it was applied, so that running it again, claim, take-over
/// or completion alike, is as safe as the first time, and its outcome is
/// the one that counts (unlike after a broken connection, see `held`).
fn is_refused_on_this_connection(error: &sqlx::Error) -> bool {
    sql::error_code(error).as_deref() == Some("25006") || is_stale_statement(error)
}

/// Whether a refusal for what the connection carries (see
/// [`is_refused_on_this_connection`]) meets the connections idle beside it
/// too: read-only transactions, since they were opened to the same server
/// before the failover, and a result type changed by an `ALTER TABLE`
/// (0A000), since each prepared the statement before it. Statements lost
/// to a `DISCARD ALL` (26000, 42P05) are that connection's alone; behind
/// a pooler in transaction mode they are lost at random, on old and new
/// connections alike, and closing the idle ones would only have every
/// statement open a connection, one more login each, to no end.
fn is_refused_on_every_connection(error: &sqlx::Error) -> bool {
    matches!(sql::error_code(error).as_deref(), Some("25006" | "0A000"))
}

/// A random pause of up to 1 ms after the first race, doubling with each
/// one after it up to 64 ms.
fn race_pause(races: usize) -> Duration {
    let ceiling = 1_u64 << races.saturating_sub(1).min(6);
    Duration::from_micros(rand::random_range(0..=ceiling * 1000))
}

/// Runs `$statement` on a leased connection, and again on another while
/// the one it ran on turns out broken, or while it is rolled back for
/// racing a concurrent statement, and once more on another connection
/// when the server refused it for what its connection carries (read-only
/// transactions, stale prepared statements). Every statement here is safe to
/// run twice: claims and take-overs carry the claim's token (a claim that
/// finds its own token acquired the key), and the rest are fenced by it
/// or only read. Evaluates to the outcome and, if a connection broke on
/// the way, that first error: a write that then finds its token gone may
/// have been applied before the break.
macro_rules! on_live_connection {
    ($store:expr, |$connection:ident| $statement:expr) => {
        on_live_connection!(
            $store,
            Patience::WaitForServer,
            None::<&Unanswered<'_>>,
            |$connection| $statement
        )
    };
    // `$patience`: how long to wait for a new connection while the server
    // takes none (see `Patience`); `$undo`: the claim whose statement this
    // is, undone if its caller stops waiting for it (see `Undo`) or if a
    // connection breaks on the way (see `Unanswered`).
    ($store:expr, $patience:expr, $undo:expr, |$connection:ident| $statement:expr) => {{
        let mut broke: Option<StoreError> = None;
        let mut retries = 0;
        let mut refused_once = false;
        loop {
            let mut lease = $store.inner.connections.lease($patience).await?;
            if let Some(unanswered) = $undo {
                lease.undo_if_abandoned(unanswered.undo);
            }
            let outcome = {
                let $connection = lease.connection();
                $statement.await
            };
            match outcome {
                Err(error)
                    if retries < broken_connection_retries($store.pool())
                        && is_broken_connection(&error) =>
                {
                    retries += 1;
                    tracing::debug!(%error, "a PostgreSQL connection broke; trying another");
                    if let Some(unanswered) = $undo {
                        unanswered.may_have_been_applied();
                    }
                    // Returned to the sqlx pool, which discards it.
                    let failed = lease.finish(Err::<(), _>(error));
                    if broke.is_none() {
                        broke = failed.err();
                    }
                }
                // Once only: a server that stays read-only (a store
                // pointed at a standby) costs each statement one more try,
                // not one per connection.
                Err(error) if !refused_once && is_refused_on_this_connection(&error) => {
                    refused_once = true;
                    tracing::debug!(%error, "PostgreSQL refused a statement for what its connection carries; trying another connection");
                    $store.inner.connections.warn_once_if_statements_lost(&error);
                    let everywhere = is_refused_on_every_connection(&error);
                    // Closed, and with it, where they carry the same, the
                    // idle connections opened or prepared before it: the
                    // next is then a new one, which reaches the primary
                    // once the failover is through, and prepares the
                    // statement afresh.
                    drop(lease.finish(Err::<(), _>(error)));
                    if everywhere {
                        $store.inner.connections.close_idle();
                    }
                }
                Err(error) if retries < BROKEN_CONNECTION_RETRIES && is_rolled_back_race(&error) => {
                    retries += 1;
                    tracing::debug!(%error, "a PostgreSQL statement raced another and was rolled back; running it again");
                    drop(lease.finish(Err::<(), _>(error)));
                    // Not at once: statements run again together keep
                    // failing each other.
                    tokio::time::sleep(race_pause(retries)).await;
                }
                outcome => break (lease.finish(outcome), broke),
            }
        }
    }};
}

/// A [`Store`] on a PostgreSQL table.
///
/// ```no_run
/// use idempotent_core::{Idempotency, store::PostgresStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::connect("postgres://app@db/app").await?;
/// store.migrate().await?;
/// let _reaper = store.spawn_reaper(std::time::Duration::from_secs(60));
/// let idempotency = Idempotency::new(store);
/// # let _ = idempotency;
/// # Ok(())
/// # }
/// ```
///
/// When the server stops taking connections (refused, starting up, too
/// many clients), sqlx's pool tries again without a word until its acquire
/// timeout. The store then connects once itself, at most once a second,
/// to learn why: the cause is logged (at `ERROR`) when an outage begins or
/// changes, and its end (at `INFO`), and until then a claim that needs a
/// new connection fails at once with it, answering 503 without waiting
/// for the store timeout. Renewals, completions and releases wait for the
/// server as before. A statement the pool has a connection ready for is
/// not touched by any of this; nor is one that waits for a pool whose
/// every connection is open and busy, refused more by a limit the server
/// counts them against (the role's `CONNECTION LIMIT`, `max_connections`):
/// it waits for one of them to come back.
///
/// After a failover, connections opened to the old primary, now a standby
/// or fenced read-only, are refused every write ("cannot execute ... in a
/// read-only transaction"). The first statement to meet one closes it and
/// every connection idle beside it, and runs once more on a new
/// connection: such a refusal applied nothing, so that the statement runs
/// once either way. A server that stays read-only answers 503. A
/// statement the connection had prepared that no longer matches the
/// server runs once more too: an `ALTER TABLE ... TYPE` of the store's
/// table changed its result ("cached plan must not change result type"),
/// which closes the idle connections as well, since each prepared it
/// before; or something sharing the pool ran `DISCARD ALL` on the
/// connection, which closes that connection alone. Through PgBouncer, use
/// session pooling, or PgBouncer 1.21 or later with
/// `max_prepared_statements` set: in transaction pooling, statements
/// prepared on one server connection are run on another, and the store
/// warns of it the first time. Where the server cannot tell (a name
/// another client prepared for other SQL), a claim's two statements take
/// different numbers of parameters, so that one run as the other is
/// refused (503) rather than misread as a claim taken over.
///
/// A table changed after `migrate` accepted it is named in the error,
/// with what to change: one that refuses the store's rows (a NOT NULL
/// column, a CHECK, a foreign key, a unique index or an exclusion
/// constraint added, a narrower type) or lacks a column is a
/// [`StoreError::Misconfigured`]; a column whose type changed so that a
/// stored record no longer reads is a [`StoreError::Codec`], answered
/// 500 `record-corrupt`, and never run again, even with `fail_open`: its
/// request ran.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    connections: Connections,
    clock: SharedClock,
    table: String,
    sql: Statements,
    /// Releases of claims that failed after a connection broke under
    /// them (see [`Unanswered`]), for [`Store::settle`].
    unanswered: TaskTracker,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table)
            .finish_non_exhaustive()
    }
}

/// Builds a [`PostgresStore`] on an existing pool.
#[derive(Debug)]
#[must_use]
pub struct PostgresStoreBuilder {
    pool: PgPool,
    table: String,
    clock: SharedClock,
    hold_connections: Option<u32>,
}

impl PostgresStoreBuilder {
    /// The table to keep records in (default `idempotency_records`); may be
    /// schema-qualified, `schema.table`. Each part is quoted in SQL, so a
    /// reserved word (`order`, `user`) works, and folded to lower case, as
    /// a name written without quotes is: `Records` is the table `records`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The clock that decides leases and expiry (default: the system
    /// clock). Every instance sharing a table should use the same time.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How many of the pool's connections the store keeps checked out
    /// for its statements (default: half the pool's `max_connections`,
    /// rounded down, so a pool of one connection stays the application's;
    /// [`PostgresStore::connect`] makes a pool of 16 and keeps 15). Capped
    /// at one less than the pool's size, so that the application, purges
    /// and migrations always have a connection: under steady traffic a
    /// kept connection is never unused long enough to go back.
    ///
    /// sqlx pings every connection returned to its pool, one more round
    /// trip per statement; a kept connection goes from one statement
    /// straight to the next. The store's statements then run on at most
    /// `connections` connections, waiting their turn in order, and the
    /// rest of the pool stays free for the application, migrations and
    /// purges. Kept connections go back to the pool after a second unused
    /// or a minute in all, after any error, and at once when the pool is
    /// closed. `0` runs every statement on a connection taken from the
    /// pool and returned after it.
    pub fn hold_connections(mut self, connections: u32) -> Self {
        self.hold_connections = Some(connections);
        self
    }

    /// Builds the store. No query runs until the store is used; call
    /// [`PostgresStore::migrate`] to create the table.
    ///
    /// # Errors
    /// The table name is not a plain SQL identifier, or names a
    /// temporary schema, whose tables are each connection's own.
    pub fn build(self) -> Result<PostgresStore, InvalidTableName> {
        sql::check_table_name(&self.table, is_temporary_schema)?;
        let sql = Statements::new(&sql::quoted(&self.table));
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                connections: Connections::new(self.pool, self.hold_connections, &self.table),
                clock: self.clock,
                table: self.table,
                sql,
                unanswered: TaskTracker::new(),
            }),
        })
    }
}

impl PostgresStore {
    /// Connects a pool of 16 connections to `url` with settings suited to
    /// short idempotency queries, on the default table. The store keeps 15
    /// of them for its statements (see
    /// [`hold_connections`](PostgresStoreBuilder::hold_connections)).
    ///
    /// Connections are not pinged before use: after a database restart, a
    /// statement that meets a broken connection runs again on the next
    /// (up to 40 times, or as many as the pool has connections if more),
    /// so requests do not see the restart once the database answers.
    ///
    /// # Errors
    /// The URL is invalid or not a `postgres://` one, or the first
    /// connection fails: the error names the server, role and database.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(parse_url(url)?).await
    }

    /// Like [`connect`](Self::connect), with connection options built in
    /// code (TLS, application name, ...).
    ///
    /// # Errors
    /// The first connection fails.
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self, StoreError> {
        let connected = Self::pool_options()
            .max_connections(16)
            .connect_with(options.clone())
            .await;
        let pool = match connected {
            Ok(pool) => pool,
            Err(error) => {
                let cause = first_connection_error(error, &options).await;
                return Err(connect_error(cause, &options));
            }
        };
        // The pool is the store's own: keep all of it but one connection,
        // which stays free for migrations and purges.
        let keep = pool.options().get_max_connections().saturating_sub(1);
        Self::builder(pool)
            .hold_connections(keep)
            .build()
            .map_err(StoreError::backend)
    }

    /// The pool settings [`connect`](Self::connect) uses, for a pool of
    /// your own sized for the store (see
    /// [`hold_connections`](PostgresStoreBuilder::hold_connections)):
    /// connections are not pinged before use, and waiting for one is cut
    /// after five seconds.
    ///
    /// ```no_run
    /// use idempotent_core::store::PostgresStore;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PostgresStore::pool_options()
    ///     .max_connections(33)
    ///     .connect("postgres://app@db/app")
    ///     .await?;
    /// let store = PostgresStore::builder(pool).hold_connections(32).build()?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
    }

    /// Starts building a store on `pool`: a `PgPool` of the `sqlx` this
    /// crate re-exports as [`idempotent_core::sqlx`](crate::sqlx), made with
    /// [`pool_options`](Self::pool_options) or by a `sqlx` 0.8 of your own
    /// with the `postgres` and `runtime-tokio` features.
    pub fn builder(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            clock: Arc::new(SystemClock),
            hold_connections: None,
        }
    }

    /// Creates the table and its index if they do not exist. Safe to run on
    /// every start, from many instances at once.
    ///
    /// Runs no `CREATE` when both exist: a role that may only read and
    /// write the table's rows (`SELECT`, `INSERT`, `UPDATE`, `DELETE`)
    /// can call it once the table was made by a role that may (with the
    /// SQL of [`migration_sql`](Self::migration_sql)), and is then
    /// refused at once if it lacks one of those privileges.
    ///
    /// Logs a warning, and goes on, when the store's clock is more than a
    /// second from PostgreSQL's (instances decide leases by their own
    /// clocks), or when PostgreSQL may lose the store's commits to a crash
    /// (an `UNLOGGED` table, `synchronous_commit = off`): either way,
    /// requests may run twice.
    ///
    /// # Errors
    /// The database refused (for example, no `CREATE` privilege, or no
    /// such schema), a table of the same name exists without the store's
    /// columns or without its primary key on `(scope, key)` (made by
    /// something else), with a column the store leaves empty that is `NOT
    /// NULL` without a default, with `key` compared by a
    /// nondeterministic collation (without regard to case), or with a
    /// unique index or an exclusion constraint that two records can
    /// collide on (on `key` alone), the role may not read or write the
    /// table or use its schema, the server's catalogs could not be read
    /// for the table (a server that is not PostgreSQL's own), or the
    /// server takes no writes from the role (a hot standby,
    /// `default_transaction_read_only`): each error, a
    /// [`StoreError::Misconfigured`], says what to change.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // PostgreSQL checks the `CREATE` privilege before it looks for
        // the table `IF NOT EXISTS` names, so the script fails for a role
        // without it even when it would create nothing: look first. A
        // look that fails stops here, saying so: the script would skip
        // every check of the table, or blame a missing `CREATE`. Both run
        // on one connection, so that the pool gains one connection at most.
        // A connection refused is told as `connect` tells it: the role
        // may lack `CONNECT`, which is not the `CREATE` the script needs.
        let mut connection = (self.pool().acquire().await)
            .map_err(|error| connect_error(error, &self.pool().connect_options()))?;
        self.warn_of_risks(&mut connection).await;
        // Again only for a table that another instance made meanwhile
        // (see `Created::Meanwhile`), which the next look finds.
        while let Created::Meanwhile = self.migrate_on(&mut connection).await? {}
        Ok(())
    }

    /// [`migrate`](Self::migrate)'s look at the table, its checks, and
    /// what it creates, on `connection`.
    async fn migrate_on(&self, connection: &mut Leased) -> Result<Created, StoreError> {
        let existing = match self.existing(connection).await {
            Ok(existing) => existing,
            Err(error) => {
                self.check_schema_usage(connection, &error).await?;
                return Err(inspection_error(error, &self.inner.table));
            }
        };
        let table_exists = existing.is_table();
        if table_exists {
            let table = &existing;
            self.check_columns(&table.columns)?;
            let name = &self.inner.table;
            sql::check_required(name, &table.required, "PostgresStore")?;
            let folding =
                (table.folding.as_ref()).map(|collation| format!("the collation `{collation}`"));
            sql::check_key_collation(name, folding.as_deref(), "PostgresStore")?;
            sql::check_key(name, table.keyed, "PostgresStore")?;
            sql::check_unique_indexes(name, table.colliding.as_deref(), "PostgresStore")?;
            if table.indexed {
                self.check_privileges(table)?;
                check_writable(table)?;
                return Ok(Created::Done);
            }
        }
        // What is to be created would be refused too, as a statement
        // failing for now ("cannot execute CREATE TABLE in a read-only
        // transaction"): the server takes no writes from the role.
        check_writable(&existing)?;
        self.create(connection, table_exists).await
    }

    /// The SQL [`migrate`](Self::migrate) runs to create `table` (as
    /// given to [`PostgresStoreBuilder::table`]) and its index, for
    /// migrations run apart from the service, by a role that may create
    /// tables. The service's role then needs only `SELECT`, `INSERT`,
    /// `UPDATE` and `DELETE` on the table (and `USAGE` on its schema).
    ///
    /// ```
    /// use idempotent_core::store::PostgresStore;
    ///
    /// let sql = PostgresStore::migration_sql("app.idempotency")?;
    /// assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS \"app\".\"idempotency\" ("));
    /// # Ok::<(), idempotent_core::store::InvalidTableName>(())
    /// ```
    ///
    /// # Errors
    /// The table name is one [`PostgresStoreBuilder::build`] refuses.
    pub fn migration_sql(table: &str) -> Result<String, InvalidTableName> {
        sql::check_table_name(table, is_temporary_schema)?;
        Ok(schema_for(table))
    }

    /// The table as it is: its columns, whether an index is led by
    /// `expires_at` and one keys it on `(scope, key)`, and which of the
    /// privileges the statements need the role lacks on it (see
    /// [`inspection_sql`]).
    async fn existing(&self, connection: &mut Leased) -> Result<Existing, sqlx::Error> {
        // Catalog columns differ between versions: a query naming one the
        // server lacks would fail, and every check with it.
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
            .fetch_one(&mut **connection)
            .await?;
        let inspect = inspection_sql(&self.inner.table, Catalog::for_version(version));
        let (
            names,
            types,
            indexed,
            keyed,
            missing,
            role,
            standby,
            read_only,
            required,
            folding,
            colliding,
        ): Inspected = sqlx::query_as(&inspect)
            .fetch_one(&mut **connection)
            .await?;
        let writes = match (standby, read_only) {
            (true, _) => Writes::Standby,
            (false, true) => Writes::ReadOnly,
            (false, false) => Writes::Taken,
        };
        Ok(Existing {
            columns: names.into_iter().zip(types).collect(),
            indexed,
            keyed,
            required,
            folding,
            colliding,
            missing,
            role,
            writes,
        })
    }

    /// Warns of what lets requests run twice without an error: a store's
    /// clock far from the server's, or a table or role whose commits a
    /// crash may lose. A look that fails (no such schema, no `USAGE` on
    /// it) warns of nothing: `migrate` says what is wrong then.
    async fn warn_of_risks(&self, connection: &mut Leased) {
        // The name is a checked identifier, safe in a string literal.
        let look = format!(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                    COALESCE((SELECT relpersistence = 'u' FROM pg_class
                              WHERE oid = to_regclass('{quoted}')), FALSE),
                    current_setting('synchronous_commit') = 'off',
                    current_user::text",
            quoted = sql::quoted(&self.inner.table)
        );
        let asked = self.now();
        let looked = sqlx::query_as::<_, (i64, bool, bool, String)>(&look)
            .fetch_one(&mut **connection)
            .await;
        let Ok((server, unlogged, asynchronous, role)) = looked else {
            return;
        };
        // Named as the Redis store's checks name theirs: a service may use
        // several databases, whose settings are not this one's.
        let address = address(&self.pool().connect_options());
        warn_if_clock_skewed(&address, asked, from_sql_millis(server), self.now());
        let durability = (unlogged, asynchronous);
        warn_if_not_durable(&address, &self.inner.table, &role, durability);
    }

    /// Refuses a role without `USAGE` on the table's schema, which
    /// `inspection` (the look at the table) failed on: every statement
    /// would fail the same way, and the script's failure would read as a
    /// missing `CREATE`. Any other failure is told as the look's own.
    async fn check_schema_usage(
        &self,
        connection: &mut Leased,
        inspection: &sqlx::Error,
    ) -> Result<(), StoreError> {
        // 42501: refused for a privilege the role lacks.
        if sql::error_code(inspection).as_deref() != Some("42501") {
            return Ok(());
        }
        let schema = schema_of(&self.inner.table);
        let denied: Option<String> = sqlx::query_scalar(
            "SELECT current_user::text FROM pg_namespace
             WHERE nspname = $1 AND NOT has_schema_privilege(oid, 'USAGE')",
        )
        .bind(schema.to_ascii_lowercase())
        .fetch_optional(&mut **connection)
        .await
        .ok()
        .flatten();
        match denied {
            None => Ok(()),
            Some(role) => Err(StoreError::misconfigured(SchemaNotPermitted {
                schema: schema.to_owned(),
                schema_sql: sql::quoted(schema),
                table: self.inner.table.clone(),
                role_sql: quote_ident(&role),
                role,
            })),
        }
    }

    /// Refuses a role that lacks privileges the statements need on an
    /// existing table: every request would fail on them.
    fn check_privileges(&self, existing: &Existing) -> Result<(), StoreError> {
        if existing.missing.is_empty() {
            return Ok(());
        }
        Err(StoreError::misconfigured(TableNotPermitted {
            table: self.inner.table.clone(),
            table_sql: sql::quoted(&self.inner.table),
            role: existing.role.clone(),
            role_sql: quote_ident(&existing.role),
            missing: existing.missing.join(", "),
        }))
    }

    /// Runs the schema's `CREATE` statements (only the index's when the
    /// table exists), then refuses a table of another shape.
    async fn create(
        &self,
        connection: &mut Leased,
        table_exists: bool,
    ) -> Result<Created, StoreError> {
        let inner = &self.inner;
        let mut schema = schema_for(&inner.table);
        if table_exists {
            // A role that owns the table may lack `CREATE` on its schema.
            schema = schema
                .find("CREATE INDEX")
                .map_or(schema.clone(), |start| schema[start..].to_owned());
        }
        // A table of the same name made by something else is kept by `IF
        // NOT EXISTS`: the script ends by reading the table's columns (the
        // name is a checked identifier, safe in a string literal), in the
        // same round trip, to refuse it.
        let columns = format!(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = to_regclass('{quoted}') AND attnum > 0 AND NOT attisdropped",
            quoted = sql::quoted(&inner.table)
        );
        // Concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the
        // catalog, so an advisory lock per table name serializes them. A
        // multi-statement simple query runs as one transaction, which holds
        // the lock to the end. The name is a checked identifier, safe to
        // put in a string literal. It is folded to lower case in SQL, and so
        // in the lock's name; and the schema is left out of it, since
        // `records` on the search path may be `public.records`: every
        // spelling of one table shares the lock (tables of one name in
        // two schemas only wait for each other's migration).
        let script = format!(
            "SELECT pg_advisory_xact_lock(hashtext('idempotent:{table}'));\n{schema}\n{columns};",
            table = sql::base_name(&inner.table).to_ascii_lowercase()
        );
        // Through the connection's own `fetch_all`: `RawSql::fetch_all`
        // on a borrowed connection makes the future not `Send`.
        match connection.fetch_all(sqlx::raw_sql(&script)).await {
            Ok(rows) => {
                self.check_columns(&columns_of(&rows))?;
                Ok(Created::Done)
            }
            Err(error) => {
                // Its index fails on a column such a table lacks: what
                // the table lacks is then the error to tell.
                let found = sqlx::query_as(&columns).fetch_all(&mut **connection).await;
                let found: Vec<(String, String)> = found.unwrap_or_default();
                self.check_columns(&found)?;
                let refused = sql::error_code(&error).as_deref() == Some("42501");
                if refused && !table_exists && !found.is_empty() {
                    return Ok(Created::Meanwhile);
                }
                let schema = self.creation_schema_sql(connection).await;
                Err(migrate_error(error, &inner.table, table_exists, &schema))
            }
        }
    }

    /// The schema `CREATE TABLE` puts the table in, as SQL text: the one
    /// its name gives, or else the first schema of the connection's
    /// `search_path` that the role may use (`current_schema()`), which is
    /// not `public` for a role whose `search_path` names a schema of the
    /// application's own, nor where a schema of the role's name exists.
    async fn creation_schema_sql(&self, connection: &mut Leased) -> String {
        let table = &self.inner.table;
        if table.contains('.') {
            return sql::quoted(schema_of(table));
        }
        let current = sqlx::query_scalar::<_, Option<String>>("SELECT current_schema()::text")
            .fetch_one(&mut **connection)
            .await;
        match current {
            Ok(Some(schema)) => quote_ident(&schema),
            _ => sql::quoted(schema_of(table)),
        }
    }

    /// Refuses a table whose `found` columns (name, type) are not the
    /// store's: every statement would fail on it.
    fn check_columns(&self, found: &[(String, String)]) -> Result<(), StoreError> {
        sql::check_columns(&self.inner.table, found, (COLUMNS, true), "PostgresStore")
    }

    /// Deletes every completed record whose replay window has passed, and
    /// every claim whose lease lapsed a minute or more ago; returns how
    /// many. Claims already treat such rows as absent, so this only frees
    /// space. A claim whose lease lapsed more recently stays: nobody took
    /// it over, so its holder, whose renewals may have been held up for a
    /// moment (or whose clock runs behind this one), still holds it and
    /// may complete it, and its response is then replayed.
    ///
    /// # Errors
    /// The database failed.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let (now, lapsed) = sql::purge_deadlines(self.inner.clock.now_millis());
        let table = &self.inner.table;
        sql::purge_in_batches(|| async move {
            let failed = |error| statement_error(error, table);
            let mut connection = self.pool().acquire().await.map_err(failed)?;
            let deleted = sqlx::query(&self.inner.sql.purge)
                .bind(now)
                .bind(sql::PURGE_BATCH)
                .bind(lapsed)
                .execute(&mut *connection)
                .await;
            if let Err(error) = &deleted {
                close_if_stale(&mut connection, error);
            }
            Ok(deleted.map_err(failed)?.rows_affected())
        })
        .await
    }

    /// Runs [`purge_expired`](Self::purge_expired) every `period` (at
    /// least a millisecond) on a background task until the returned
    /// [`Reaper`] is dropped (at once) or [shut down](Reaper::shutdown)
    /// (once the purge under way has finished). Failures are logged and
    /// retried on the next tick.
    ///
    /// # Panics
    /// Called outside a Tokio runtime, which the task is spawned on (as
    /// `tokio::spawn` does).
    #[must_use = "the reaper stops when dropped"]
    pub fn spawn_reaper(&self, period: Duration) -> Reaper {
        sql::spawn_reaper(self.clone(), period)
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        self.inner.connections.pool()
    }

    /// The table records live in, as it was configured: the statements
    /// quote it (see [`PostgresStoreBuilder::table`]), so SQL of your own
    /// that names it must quote a reserved word too.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_millis()
    }

    /// [`Store::claim`] under `unanswered`'s token, whose fate is told
    /// to it when a connection breaks under one of its statements.
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
        unanswered: &Unanswered<'_>,
    ) -> Result<Claim, StoreError> {
        let token = unanswered.token;
        let token_bytes = token.to_bytes();
        let undo = Some(unanswered);
        // Nothing has run yet: while the server takes no new connections,
        // the client is better told at once (503) than after the store
        // timeout. The statements after it wait for the server instead.
        let patience = Patience::FailFast;
        for _ in 0..sql::CLAIM_ATTEMPTS {
            // Both statements take the claim's six parameters (the
            // take-over one more, the deadline it found); the time is
            // read for each run, so one rerun after a broken connection
            // does not claim with a lease already partly spent.
            let query = |statement| {
                let now = self.now();
                sqlx::query(statement)
                    .bind(key.scope.as_bytes().as_slice())
                    .bind(key.key.as_str())
                    .bind(fingerprint.as_bytes().as_slice())
                    .bind(token_bytes.as_slice())
                    .bind(to_sql_millis(now.saturating_add(millis(lease))))
                    .bind(to_sql_millis(now))
            };
            let (row, _) = on_live_connection!(self, patience, undo, |connection| query(
                &self.inner.sql.claim
            )
            .fetch_optional(connection));
            // No row: a claim committed after the snapshot; look again.
            let Some(row) = row? else { continue };
            let row = TableRow::new(&row, &self.inner.table, STORE);
            if row.column::<bool>("live")? {
                return claim_from_row(&row, token);
            }
            let found: i64 = row.column("expires_at")?;
            let (taken, _) = on_live_connection!(self, patience, undo, |connection| query(
                &self.inner.sql.take_over
            )
            .bind(found)
            .execute(connection));
            // Nothing taken after a break may be a take-over that was
            // applied: the next claim finds its own token then.
            if taken?.rows_affected() > 0 {
                return Ok(Claim::Acquired(token));
            }
        }
        Err(StoreError::backend(sql::Contended))
    }
}

/// Why the pool's first connection failed. The pool tries a refused
/// connection again until its acquire timeout, then reports only that it
/// timed out; one direct attempt names the cause (connection refused,
/// authentication failed, no such database).
async fn first_connection_error(error: sqlx::Error, options: &PgConnectOptions) -> sqlx::Error {
    if matches!(error, sqlx::Error::PoolTimedOut) {
        let attempt = sqlx::PgConnection::connect_with(options);
        if let Ok(Err(cause)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return cause;
        }
    }
    error
}

/// A URL as [`PostgresStore::connect`] takes it. sqlx reads any scheme
/// (`redis://`, `http://`) as PostgreSQL's, and would connect a URL meant
/// for another store to whatever listens at its port.
fn parse_url(url: &str) -> Result<PgConnectOptions, StoreError> {
    const EXPECTED: &str = "give a URL such as `postgres://user:password@host:5432/database`";
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if let Some(scheme) = scheme.filter(|scheme| !matches!(*scheme, "postgres" | "postgresql")) {
        let cause = format!("`{scheme}://` is not a PostgreSQL URL");
        return Err(Explained::misconfigured(
            sqlx::Error::Configuration(cause.into()),
            EXPECTED,
        ));
    }
    PgConnectOptions::from_str(url).map_err(|error| Explained::misconfigured(error, EXPECTED))
}

/// The first connection's failure, with the server (its socket, if it has
/// one), role and database it was for (never the password), and what to
/// check.
fn connect_error(cause: sqlx::Error, options: &PgConnectOptions) -> StoreError {
    let role = quote_ident(options.get_username());
    let database = options.get_database().unwrap_or(options.get_username());
    let (fix, setup) = match sql::error_code(&cause).as_deref() {
        Some("3D000") => (
            "create the database, or name an existing one in the URL".to_owned(),
            true,
        ),
        Some("28000") => (
            "create the role (it must be allowed to log in), or name an existing one in the URL"
                .to_owned(),
            true,
        ),
        Some("28P01") => ("check the password in the URL".to_owned(), true),
        // `CONNECT` revoked from `PUBLIC` on the database, and not
        // granted to the role.
        Some("42501") => (
            format!(
                "grant the role CONNECT on the database as its owner (`GRANT CONNECT ON DATABASE {} TO {role}`)",
                quote_ident(database)
            ),
            true,
        ),
        _ if matches!(cause, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => (
            "check that PostgreSQL runs and listens there".to_owned(),
            false,
        ),
        _ => ("check the URL and the server".to_owned(), false),
    };
    // The socket when there is one: sqlx dials it, not the host and port
    // it keeps beside it (`localhost:5432` unless the URL names others).
    let hint = format!(
        "connecting to PostgreSQL at {address} as role `{user}`, database `{database}`: {fix}",
        address = address(options),
        user = options.get_username(),
    );
    if setup {
        Explained::misconfigured(cause, hint)
    } else {
        Explained::store_error(cause, hint)
    }
}

/// `pg_temp`, which names the connection's own temporary schema, or that
/// schema's real name, `pg_temp_<n>`.
fn is_temporary_schema(schema: &str) -> bool {
    schema == "pg_temp" || schema.starts_with("pg_temp_")
}

/// The `(name, type)` rows of the migration script's last statement;
/// its lock's row has one column.
fn columns_of(rows: &[PgRow]) -> Vec<(String, String)> {
    rows.iter()
        .filter(|row| row.len() == 2)
        .filter_map(|row| Some((row.try_get(0).ok()?, row.try_get(1).ok()?)))
        .collect()
}

/// The columns [`SCHEMA`] creates, with their types as `format_type`
/// names them.
const COLUMNS: &[(&str, &str)] = &[
    ("scope", "bytea"),
    ("key", "text"),
    ("fingerprint", "bytea"),
    ("lease_token", "bytea"),
    ("expires_at", "bigint"),
    ("status", "smallint"),
    ("header_names", "text[]"),
    ("header_values", "bytea[]"),
    ("body", "bytea"),
];

/// Why [`PostgresStore::migrate`] failed, with what to do about it.
/// `table_exists`: the table was there, and only its index was to be
/// created; `schema_sql`: the schema the table was to be created in, as
/// SQL text.
fn migrate_error(
    error: sqlx::Error,
    table: &str,
    table_exists: bool,
    schema_sql: &str,
) -> StoreError {
    let hint = match sql::error_code(&error).as_deref() {
        Some("42501") if table_exists => format!(
            "the table `{table}` has no index on `expires_at`, which only its owner may create: run the `CREATE INDEX` statement of `PostgresStore::migration_sql(\"{table}\")` as the table's owner"
        ),
        Some("42501") => format!(
            "the role may not create the table `{table}`: grant it CREATE on the schema (`GRANT CREATE ON SCHEMA {schema_sql} TO ...`), or run `PostgresStore::migrate()` as a role that may and grant this one SELECT, INSERT, UPDATE and DELETE on the table"
        ),
        Some("3F000") if table.contains('.') => format!(
            "the schema of the table `{table}` does not exist: create it (`CREATE SCHEMA ...`), or name a table in an existing schema"
        ),
        // "no schema has been selected to create in": the table is named
        // without one, and none of the `search_path` exists.
        Some("3F000") => format!(
            "no schema of the role's `search_path` exists to create the table `{table}` in (the `public` schema dropped, or a `search_path` set for the role, its database or in the connection options that names schemas not made yet; `SHOW search_path` tells it): name the table with its schema, as `PostgresStoreBuilder::table(\"schema.{table}\")`, or create the first schema of the `search_path`"
        ),
        _ => return statement_error(error, table),
    };
    Explained::misconfigured(error, hint)
}

/// Why [`PostgresStore::migrate`] failed when its look at the table
/// `table` in the catalogs did: a server that answered it with an error
/// has catalogs other than those of the PostgreSQL versions the look is
/// written for, and `migrate` cannot tell whether the table is one the
/// store can work on. A failure to reach the server is told as such.
fn inspection_error(error: sqlx::Error, table: &str) -> StoreError {
    if error.as_database_error().is_none() {
        return statement_error(error, table);
    }
    Explained::misconfigured(
        error,
        format!(
            "`PostgresStore::migrate()` could not inspect the table `{table}` in the server's catalogs (`pg_attribute`, `pg_index`, `pg_collation`, `pg_depend`), so it cannot tell whether the store can work on it: a server that speaks PostgreSQL's protocol may lack some of them; create the table with the SQL of `PostgresStore::migration_sql(\"{table}\")` by other means, and do not call `migrate()` on such a server"
        ),
    )
}

/// The schema `table` is in, as configured: `public` for a name without
/// one, where the role's search path finds it by default.
fn schema_of(table: &str) -> &str {
    table.split_once('.').map_or("public", |(schema, _)| schema)
}

/// How far the store's clock may be from PostgreSQL's before `migrate`
/// warns: NTP keeps clocks within milliseconds, so a second off is a clock
/// nothing keeps, which drifts on. Claims take over leases that lapsed by
/// the claiming instance's clock, renewed every third of a lease:
/// instances whose clocks disagree by two thirds of a lease take over
/// each other's running claims.
const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(1);

/// Warns when the store's clock, read at `asked` and at `answered` around
/// a query that read the clock of PostgreSQL at `address` as `server`
/// (Unix ms), is further from it than [`CLOCK_SKEW_WARNING`], however the
/// round trip divides.
/// PostgreSQL's clock stands for the other instances' here: the store
/// never reads it otherwise, and an instance whose clock is off runs
/// requests twice without a word.
fn warn_if_clock_skewed(address: &str, asked: u64, server: u64, answered: u64) {
    let half_round_trip = answered.saturating_sub(asked) / 2;
    let midpoint = asked.saturating_add(half_round_trip);
    let (skew, direction) = if midpoint >= server {
        (midpoint - server, "ahead of")
    } else {
        (server - midpoint, "behind")
    };
    if skew.saturating_sub(half_round_trip) <= millis(CLOCK_SKEW_WARNING) {
        return;
    }
    tracing::warn!(
        server = address,
        skew_ms = skew,
        "the store's clock is {skew} ms {direction} PostgreSQL's: leases and replay windows are read from each instance's clock, so instances whose clocks disagree by two thirds of a lease take over each other's running claims and run a request twice, and a reaper whose clock runs ahead purges them; synchronize this machine's clock (NTP)"
    );
}

/// Warns when PostgreSQL at `server` may lose what the store commits to
/// `table` as `role`: a table that is `unlogged` is emptied after a crash
/// and has no rows on a standby (after a failover); commits made
/// `asynchronous`ly may be lost to a crash. Either way, records of requests that ran are
/// gone, and their retries run them again, as with the SQLite store's
/// `synchronous = NORMAL`.
fn warn_if_not_durable(
    server: &str,
    table: &str,
    role: &str,
    (unlogged, asynchronous): (bool, bool),
) {
    if unlogged {
        tracing::warn!(
            server,
            table,
            "the table `{table}` is UNLOGGED: PostgreSQL empties it after a crash, and a standby has none of its rows, so after a crash or a failover every request completed before it runs again on its retry; make it logged (`ALTER TABLE {} SET LOGGED`)",
            sql::quoted(table)
        );
    }
    if asynchronous {
        tracing::warn!(
            server,
            "`synchronous_commit` is off on the store's connections (role `{role}`): PostgreSQL answers a commit before it is on disk, and a crash loses the last claims and responses, whose retries then run their requests again; turn it on where it was turned off: the connection options (`options=-c synchronous_commit=off` in the URL), the role (`ALTER ROLE {} SET synchronous_commit = on`), the database or the server",
            quote_ident(role)
        );
    }
}

/// Refuses a server that takes no writes from the store's role, found by
/// `migrate` on a table it would otherwise accept, or before it creates
/// the table or its index, which such a server refuses: every claim
/// would fail.
fn check_writable(existing: &Existing) -> Result<(), StoreError> {
    let (role, role_sql) = (&existing.role, quote_ident(&existing.role));
    let why = match existing.writes {
        Writes::Taken => return Ok(()),
        Writes::Standby => "the server is a hot standby (in recovery), which takes no writes: connect the store to the primary".to_owned(),
        Writes::ReadOnly => format!(
            "the role `{role}`'s transactions are read-only, as `default_transaction_read_only` is on for the role, its database, the server or in the connection options: turn it off for the store's role (`ALTER ROLE {role_sql} SET default_transaction_read_only = off`), or connect to a server that takes writes"
        ),
    };
    Err(StoreError::misconfigured(NotWritable(why)))
}

/// [`SCHEMA`] for `table`, a checked name.
fn schema_for(table: &str) -> String {
    // The index name contains the default table name: swap it out first.
    SCHEMA
        .replace(&index_name(DEFAULT_TABLE), "\u{0}")
        .replace(DEFAULT_TABLE, &sql::quoted(table))
        .replace('\u{0}', &sql::quoted(&index_name(table)))
}

/// What [`PostgresStore::migrate`] found of its table.
struct Existing {
    /// `(name, type)`; none when there is no table.
    columns: Vec<(String, String)>,
    /// Whether an index is led by `expires_at`.
    indexed: bool,
    /// Whether a primary key or unique index is on exactly `(scope, key)`,
    /// the target of the claim's `ON CONFLICT`.
    keyed: bool,
    /// The columns a row must have a value in that the database does not
    /// make: `NOT NULL`, without a default, an identity or a generation.
    required: Vec<String>,
    /// A nondeterministic collation that `key`, or a unique index on it,
    /// compares by.
    folding: Option<String>,
    /// A unique index over the store's columns alone, not over both
    /// `scope` and `key`, which two records can collide on.
    colliding: Option<String>,
    /// The privileges among `SELECT`, `INSERT`, `UPDATE` and `DELETE`
    /// that the role lacks on the table.
    missing: Vec<String>,
    /// The role connected.
    role: String,
    /// Whether the server takes the role's writes.
    writes: Writes,
}

/// What [`PostgresStore::migrate`]'s `CREATE` statements did.
enum Created {
    /// The table and its index are there.
    Done,
    /// Nothing: the role may not create the table, and another instance's
    /// migration, as a role that may (a migration job started beside the
    /// service), made it while this one waited for its lock, after this
    /// one had found none. PostgreSQL refuses such a role `CREATE TABLE
    /// IF NOT EXISTS` whether the table exists or not, and `migrate` told
    /// it to grant `CREATE` on a schema where its table was ready; it
    /// looks at the table again instead, as found.
    Meanwhile,
}

/// Whether the server takes writes from the store's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// It takes them.
    Taken,
    /// A hot standby: a replica in recovery.
    Standby,
    /// `default_transaction_read_only` is on.
    ReadOnly,
}

/// The server takes no writes from the store's role; says why and what to
/// change.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL refuses the store's writes: {0}")]
struct NotWritable(String);

/// The role lacks `USAGE` on the schema of the store's table, which every
/// statement on the table needs.
#[derive(Debug, thiserror::Error)]
#[error(
    "the role `{role}` may not use the schema `{schema}` of the table `{table}` (it lacks USAGE on it): grant it as the schema's owner (`GRANT USAGE ON SCHEMA {schema_sql} TO {role_sql}`); the store's statements need it, and SELECT, INSERT, UPDATE and DELETE on the table"
)]
struct SchemaNotPermitted {
    schema: String,
    /// `schema` as the store's statements write it: quoted, so that a
    /// reserved word or a name PostgreSQL would fold works in the `GRANT`.
    schema_sql: String,
    table: String,
    role: String,
    /// `role` as SQL text (see [`quote_ident`]).
    role_sql: String,
}

impl Existing {
    fn is_table(&self) -> bool {
        !self.columns.is_empty()
    }
}

/// The store's table exists, and the role lacks privileges every request
/// needs on it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the role `{role}` may not use the table `{table}` (it lacks {missing}): grant it the rows' privileges as the table's owner (`GRANT SELECT, INSERT, UPDATE, DELETE ON {table_sql} TO {role_sql}`)"
)]
struct TableNotPermitted {
    table: String,
    /// `table` as the store's statements write it (see
    /// [`SchemaNotPermitted::schema_sql`]).
    table_sql: String,
    role: String,
    /// `role` as SQL text (see [`quote_ident`]).
    role_sql: String,
    missing: String,
}

/// The longest name PostgreSQL keeps (`NAMEDATALEN` less one, in bytes):
/// it cuts a longer one short, saying so only in a notice.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// What the name of a table's index on `expires_at` ends with.
const INDEX_SUFFIX: &str = "_expires_at_idx";

/// The name of `table`'s index on `expires_at`: the table's own name
/// (lower case, as [`sql::quoted`] writes it) and [`INDEX_SUFFIX`], cut
/// to [`MAX_IDENTIFIER_BYTES`] as PostgreSQL would cut it. For a table
/// named with that many characters, that is the table's own name, under
/// which `CREATE INDEX IF NOT EXISTS` found the table and created no
/// index: its index is named after the table's name cut shorter and a
/// digest of the whole, so that tables whose names differ only at their
/// end each get one.
fn index_name(table: &str) -> String {
    let base = sql::base_name(table).to_ascii_lowercase();
    if base.len() < MAX_IDENTIFIER_BYTES {
        let mut name = base + INDEX_SUFFIX;
        // Checked ASCII: any byte ends a character.
        name.truncate(MAX_IDENTIFIER_BYTES);
        return name;
    }
    let digest = crate::digest::short_hex(base.as_bytes());
    let kept = MAX_IDENTIFIER_BYTES - INDEX_SUFFIX.len() - digest.len() - 1;
    format!("{}_{digest}{INDEX_SUFFIX}", &base[..kept])
}

/// The statements, with the table name spliced in once.
struct Statements {
    claim: String,
    take_over: String,
    renew: String,
    complete: String,
    release: String,
    get: String,
    purge: String,
}

impl Statements {
    fn new(table: &str) -> Self {
        Self {
            // One statement, in three parts sharing one snapshot:
            // - `found` reads the key's row, if there is one, and whether
            //   it is live;
            // - only if there is none, `claimed` inserts the claim;
            // - the result is either the claim or the row.
            // Replays and in-flight duplicates are thus plain reads that take
            // no lock and write nothing. A row whose deadline passed comes
            // back marked not live, and `take_over` claims it. No row comes
            // back when a concurrent claim committed its row after the
            // snapshot was taken: the insert met it and did nothing, and the
            // next attempt sees it. The insert does nothing on a conflict,
            // rather than update under a condition, because a conditional
            // update locks the row even when the condition fails: every
            // duplicate of a burst would lock it and commit in turn, each
            // waiting for the one before (32 claims of one new key took
            // 6.3 ms against 2.8 ms without; `cargo bench -p
            // idempotent-bench --bench stores`).
            claim: format!(
                "WITH found AS (
                    SELECT expires_at > $6 AS live, lease_token = $4 AS ours,
                           fingerprint, expires_at, status,
                           header_names, header_values, body
                    FROM {table}
                    WHERE scope = $1 AND key = $2
                ),
                claimed AS (
                    INSERT INTO {table} (scope, key, fingerprint, lease_token, expires_at)
                    SELECT $1, $2, $3, $4, $5
                    WHERE NOT EXISTS (SELECT 1 FROM found)
                    ON CONFLICT (scope, key) DO NOTHING
                    RETURNING 1
                )
                SELECT TRUE AS acquired, TRUE AS live, NULL::bytea AS fingerprint,
                       NULL::bigint AS expires_at, NULL::smallint AS status,
                       NULL::text[] AS header_names, NULL::bytea[] AS header_values,
                       NULL::bytea AS body
                FROM claimed
                UNION ALL
                SELECT COALESCE(ours AND live, FALSE), live, fingerprint, expires_at, status,
                       header_names, header_values, body
                FROM found"
            ),
            // Claims a row whose deadline passed, as the claim found it
            // (`$7`, its deadline then). Of two claims taking over one row,
            // the second waits for the first and then finds the row live:
            // it updates nothing. Its seventh parameter also sets it apart
            // from the claim, the one statement that takes the other six:
            // a pooler in transaction mode without prepared-statement
            // support (PgBouncer before 1.21) runs a statement under the
            // name another client prepared, and the claim's read run as a
            // take-over would count its row as taken over while the key
            // stayed free, so that two requests ran. The server refuses a
            // statement bound with another number of parameters.
            take_over: format!(
                "UPDATE {table}
                 SET fingerprint = $3, lease_token = $4, expires_at = $5, status = NULL,
                     header_names = NULL, header_values = NULL, body = NULL
                 WHERE scope = $1 AND key = $2 AND expires_at <= $6 AND expires_at = $7"
            ),
            // A renewal applied after a later one (on another connection)
            // leaves the later deadline.
            renew: format!(
                "UPDATE {table} SET expires_at = GREATEST(expires_at, $4)
                 WHERE scope = $1 AND key = $2 AND lease_token = $3"
            ),
            complete: format!(
                "UPDATE {table}
                 SET lease_token = NULL, expires_at = $4, status = $5,
                     header_names = $6, header_values = $7, body = $8
                 WHERE scope = $1 AND key = $2 AND lease_token = $3"
            ),
            release: format!(
                "DELETE FROM {table} WHERE scope = $1 AND key = $2 AND lease_token = $3"
            ),
            get: format!(
                "SELECT fingerprint, lease_token, expires_at, status, header_names, header_values, body
                 FROM {table} WHERE scope = $1 AND key = $2 AND expires_at > $3"
            ),
            // A claim (`lease_token` set) goes only once its lease lapsed
            // by `$3`, a grace earlier than `$1`: its holder may still
            // complete it until then. The outer condition is re-checked
            // against a row that a concurrent claim just took over, or its
            // holder just completed, so a fresh claim or record is never
            // purged.
            purge: format!(
                "DELETE FROM {table}
                 WHERE (scope, key) IN (
                         SELECT scope, key FROM {table}
                         WHERE expires_at <= $1 AND (lease_token IS NULL OR expires_at <= $3)
                         LIMIT $2)
                   AND expires_at <= $1 AND (lease_token IS NULL OR expires_at <= $3)"
            ),
        }
    }
}

impl sql::Purge for PostgresStore {
    fn purge_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        PostgresStore::purge_expired(self)
    }
}

impl Store for PostgresStore {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let token = LeaseToken::random();
        let token_bytes = token.to_bytes();
        // A claim or take-over whose caller stops waiting (the engine's
        // store timeout answered 503: nothing ran) may still be applied by
        // the server, holding the key under a lease nobody has: released,
        // as is one that fails after a connection broke under it.
        let unanswered = Unanswered {
            store: self,
            key,
            token,
            undo: Undo {
                statement: &self.inner.sql.release,
                scope: key.scope.as_bytes(),
                key: key.key.as_str(),
                token: token_bytes,
                log_id: key.log_id(),
            },
            applied: AtomicBool::new(false),
        };
        let claimed = self.claim_as(key, fingerprint, lease, &unanswered).await;
        if claimed.is_ok() {
            unanswered.answered();
        }
        claimed
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let expires_at = to_sql_millis(self.now().saturating_add(millis(lease)));
        // Renewing twice sets the same deadline: a renewal applied before
        // a break still matches the token.
        let (updated, _) =
            on_live_connection!(self, |connection| sqlx::query(&self.inner.sql.renew)
                .bind(key.scope.as_bytes().as_slice())
                .bind(key.key.as_str())
                .bind(token.to_bytes().as_slice())
                .bind(expires_at)
                .execute(connection));
        held(updated?.rows_affected(), None)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let expires_at = to_sql_millis(self.now().saturating_add(millis(ttl)));
        let mut columns = ResponseColumns::new(&response);
        // PostgreSQL refuses a larger statement: keep the record without
        // its body, as the engine does past `max_body_bytes`, so that
        // retries get 410 rather than run the handler again once the
        // lease lapses.
        let headers: usize = columns.names.iter().map(String::len).sum::<usize>()
            + columns.values.iter().map(Vec::len).sum::<usize>();
        let body = columns.body.as_ref().map_or(0, Vec::len);
        if headers.saturating_add(body) > MAX_MESSAGE_BYTES {
            columns.body = None;
        }
        let (updated, broke) =
            on_live_connection!(self, |connection| sqlx::query(&self.inner.sql.complete)
                .bind(key.scope.as_bytes().as_slice())
                .bind(key.key.as_str())
                .bind(token.to_bytes().as_slice())
                .bind(expires_at)
                .bind(columns.status)
                .bind(columns.names.as_slice())
                .bind(columns.values.as_slice())
                .bind(columns.body.as_deref())
                .execute(connection));
        held(updated?.rows_affected(), broke)
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let (deleted, broke) =
            on_live_connection!(self, |connection| sqlx::query(&self.inner.sql.release)
                .bind(key.scope.as_bytes().as_slice())
                .bind(key.key.as_str())
                .bind(token.to_bytes().as_slice())
                .execute(connection));
        held(deleted?.rows_affected(), broke)
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let (row, _) = on_live_connection!(self, |connection| sqlx::query(&self.inner.sql.get)
            .bind(key.scope.as_bytes().as_slice())
            .bind(key.key.as_str())
            .bind(to_sql_millis(self.now()))
            .fetch_optional(connection));
        let table = &self.inner.table;
        row?.map(|row| record_from_row(&TableRow::new(&row, table, STORE)))
            .transpose()
    }

    async fn settle(&self) {
        self.inner.connections.settle().await;
        super::settle(&self.inner.unanswered).await;
    }

    fn deadline_clock(&self) -> Option<SharedClock> {
        Some(self.inner.clock.clone())
    }
}

/// A fenced write's outcome: the token no longer holds the key, unless a
/// connection broke first, when the write may have been applied just
/// before the break: that error then stands, so that the caller looks at
/// the record instead of taking the lease for lost.
fn held(rows: u64, broke: Option<StoreError>) -> Result<(), StoreError> {
    match (rows, broke) {
        (0, Some(broke)) => Err(broke),
        (0, None) => Err(StoreError::LeaseLost),
        _ => Ok(()),
    }
}

/// A claim under way, whose row may be in the table though its caller
/// never learns so: a statement applied on the server while the
/// connection carrying its answer broke. The claim runs it again on
/// another connection, and finds its own row; but if that fails too (the
/// server out of reach, refusing, or slow past the caller's timeout), the
/// caller is told nothing ran (503), and the row would hold the key under
/// a lease nobody has until it lapses, answering 409 to the retries.
/// Dropped without an answer after such a break, it releases the row on
/// a task of its own, once the server takes a connection again.
struct Unanswered<'a> {
    store: &'a PostgresStore,
    key: &'a RecordKey,
    token: LeaseToken,
    /// What undoes a statement whose caller stops waiting for it, on the
    /// connection it ran on (see [`Undo`]).
    undo: Undo<'a>,
    /// Whether a statement's connection broke: it may have been applied.
    applied: AtomicBool,
}

impl Unanswered<'_> {
    /// A statement's connection broke: it may have been applied.
    fn may_have_been_applied(&self) {
        self.applied.store(true, Ordering::Relaxed);
    }

    /// The claim's caller has its outcome, which counts whatever broke.
    fn answered(&self) {
        self.applied.store(false, Ordering::Relaxed);
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.applied.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        let (store, key, token) = (self.store.clone(), self.key.clone(), self.token);
        let release = async move {
            match store.release(&key, token).await {
                Ok(()) | Err(StoreError::LeaseLost) => {}
                Err(error) => tracing::warn!(
                    %error,
                    key = %key.log_id(),
                    "could not release a claim whose answer was lost; if it was applied, its key frees when its lease lapses"
                ),
            }
        };
        drop(self.store.inner.unanswered.spawn_on(release, &runtime));
    }
}

fn claim_from_row(row: &TableRow<'_>, token: LeaseToken) -> Result<Claim, StoreError> {
    if row.column::<bool>("acquired")? {
        return Ok(Claim::Acquired(token));
    }
    let fingerprint = sql::fingerprint_from(&row.column::<Vec<u8>>("fingerprint")?)?;
    let expires_at = from_sql_millis(row.column("expires_at")?);
    match completed_from_row(row, fingerprint, expires_at)? {
        Some(completed) => Ok(Claim::Completed(Arc::new(completed))),
        None => Ok(Claim::InFlight {
            fingerprint,
            lease_expires_at: expires_at,
        }),
    }
}

fn record_from_row(row: &TableRow<'_>) -> Result<Record, StoreError> {
    let fingerprint = sql::fingerprint_from(&row.column::<Vec<u8>>("fingerprint")?)?;
    let expires_at = from_sql_millis(row.column("expires_at")?);
    if let Some(completed) = completed_from_row(row, fingerprint, expires_at)? {
        return Ok(Record::Completed(Arc::new(completed)));
    }
    sql::in_flight(fingerprint, row.column("lease_token")?, expires_at)
}

/// The completed record in `row`, or `None` for an in-flight row (no status).
fn completed_from_row(
    row: &TableRow<'_>,
    fingerprint: Fingerprint,
    expires_at: u64,
) -> Result<Option<Completed>, StoreError> {
    let Some(status) = row.column::<Option<i16>>("status")? else {
        return Ok(None);
    };
    let names = row
        .column::<Option<Vec<String>>>("header_names")?
        .unwrap_or_default();
    let values = row
        .column::<Option<Vec<Vec<u8>>>>("header_values")?
        .unwrap_or_default();
    let body = row.column("body")?;
    Ok(Some(Completed {
        fingerprint,
        response: response_from(status, names, values, body)?,
        expires_at,
    }))
}

/// Rebuilds a response from its columns: status, parallel header name and
/// value lists, and the body (`None` when it was not stored).
pub(crate) fn response_from(
    status: i16,
    names: Vec<String>,
    values: Vec<Vec<u8>>,
    body: Option<Vec<u8>>,
) -> Result<StoredResponse, StoreError> {
    let status = u16::try_from(status)
        .ok()
        .and_then(|status| StatusCode::from_u16(status).ok())
        .ok_or_else(|| sql::corrupt("status"))?;
    if names.len() != values.len() {
        return Err(sql::corrupt("header names and values differ in count"));
    }
    let headers = names
        .into_iter()
        .zip(values)
        .map(|(name, value)| {
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| sql::corrupt("header"))?;
            let value = HeaderValue::from_bytes(&value).map_err(|_| sql::corrupt("header"))?;
            Ok((name, value))
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(StoredResponse {
        status,
        headers,
        body: body.map(Bytes::from),
    })
}

/// A response split into columns, as [`response_from`] reads them back.
pub(crate) struct ResponseColumns {
    pub(crate) status: i16,
    pub(crate) names: Vec<String>,
    pub(crate) values: Vec<Vec<u8>>,
    pub(crate) body: Option<Vec<u8>>,
}

impl ResponseColumns {
    pub(crate) fn new(response: &StoredResponse) -> Self {
        let (names, values) = response
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .unzip();
        Self {
            // Valid status codes are 100..=999, well inside i16.
            status: i16::try_from(response.status.as_u16()).unwrap_or(i16::MAX),
            names,
            values,
            body: response.body.as_ref().map(|body| body.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::strategies::any_response;

    /// A server's error with SQLSTATE `code`, as the pool or a statement
    /// reports it.
    fn server_error(code: &'static str) -> sqlx::Error {
        #[derive(Debug, thiserror::Error)]
        #[error("server error {0}")]
        struct Coded(&'static str);

        impl sqlx::error::DatabaseError for Coded {
            fn message(&self) -> &str {
                "server error"
            }
            fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
                Some(self.0.into())
            }
            fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
                self
            }
            fn kind(&self) -> sqlx::error::ErrorKind {
                sqlx::error::ErrorKind::Other
            }
        }
        sqlx::Error::Database(Box::new(Coded(code)))
    }

    /// What a failover, a restart or a credential rotation makes the
    /// server answer for a while is an outage (a 503 that asks for a
    /// retry soon), not a setup to change: the old primary, now a
    /// standby, refusing writes (25006); a server shutting down or
    /// starting up (57P01, 57P03); a password rotated before the pool was
    /// given the new one (28P01); statements the connection had prepared,
    /// lost to a `DISCARD ALL` or a pooler (26000, 42P05), which a new
    /// connection prepares again.
    #[test]
    fn what_a_failover_or_rotation_answers_for_a_while_is_an_outage() {
        use self::reachability::AcquireError;

        for code in [
            "25006", "57P01", "57P03", "40001", "53300", "26000", "42P05",
        ] {
            let error = statement_error(server_error(code), "records");
            assert!(matches!(error, StoreError::Backend(_)), "{code}: {error:?}");
        }
        for code in ["28P01", "57P03", "53300"] {
            let error = StoreError::from(AcquireError::Pool(server_error(code)));
            assert!(matches!(error, StoreError::Backend(_)), "{code}: {error:?}");
        }
        let told = statement_error(server_error("25006"), "records").to_string();
        assert!(
            told.contains("failover") && told.contains("if it lasts"),
            "{told}"
        );
        let told = StoreError::from(AcquireError::Pool(server_error("28P01"))).to_string();
        assert!(told.contains("current password"), "{told}");
    }

    /// A statement the server cancelled when `statement_timeout` or
    /// `lock_timeout` ran out was told in the server's words alone
    /// ("canceling statement due to statement timeout"): not what it
    /// waited for, nor where the timeout is set. An outage (503), since
    /// the lock it waited for may go.
    #[test]
    fn a_cancelled_statement_names_the_timeouts_and_what_to_look_at() {
        for code in ["57014", "55P03"] {
            let error = statement_error(server_error(code), "records");
            assert!(matches!(error, StoreError::Backend(_)), "{code}: {error:?}");
            let told = error.to_string();
            for words in [
                "statement_timeout",
                "lock_timeout",
                "applied none",
                "pg_locks",
            ] {
                assert!(
                    told.contains(words),
                    "{code}: `{words}` missing from {told}"
                );
            }
        }
    }

    /// What stays until someone changes the setup is a 500 that does not:
    /// among it, a table altered after `migrate` so that it refuses the
    /// store's rows (a NOT NULL column, a foreign key, a unique index, a
    /// CHECK, an exclusion constraint, a narrower type).
    #[test]
    fn what_only_a_change_of_setup_ends_is_misconfigured() {
        use self::reachability::AcquireError;

        let altered = [
            "23502", "23503", "23505", "23514", "23P01", "22001", "22003",
        ];
        for code in ["42P01", "42703", "42P10", "42501"]
            .into_iter()
            .chain(altered)
        {
            let error = statement_error(server_error(code), "records");
            assert!(
                matches!(error, StoreError::Misconfigured(_)),
                "{code}: {error:?}"
            );
        }
        for code in ["28000", "3D000"] {
            let error = StoreError::from(AcquireError::Pool(server_error(code)));
            assert!(
                matches!(error, StoreError::Misconfigured(_)),
                "{code}: {error:?}"
            );
        }
    }

    /// The name of a table's index is never the table's own, nor that of
    /// another table's index, however long the names: a table named with
    /// the longest name PostgreSQL keeps gets a name of its own; a shorter
    /// one keeps the name PostgreSQL gave it, cut where PostgreSQL cut it.
    #[test]
    fn index_names_fit_and_stay_apart() {
        let long = |end: &str| format!("{}{end}", "a".repeat(MAX_IDENTIFIER_BYTES - end.len()));
        let (one, two) = (long("1"), long("2"));
        let (index_one, index_two) = (index_name(&one), index_name(&two));
        for (index, table) in [(&index_one, &one), (&index_two, &two)] {
            assert!(index.len() <= MAX_IDENTIFIER_BYTES, "{index}");
            assert_ne!(index, table);
            assert!(index.ends_with(INDEX_SUFFIX), "{index}");
        }
        assert_ne!(index_one, index_two);
        assert_eq!(index_name(&format!("App.{one}")), index_one);
        let shorter = &one[1..];
        assert_eq!(index_name(shorter), format!("{shorter}_"));
        assert_eq!(index_name("App.Records"), "records_expires_at_idx");
    }

    /// Column values a damaged or hand-edited row may hold.
    fn any_columns() -> impl Strategy<Value = (i16, Vec<String>, Vec<Vec<u8>>)> {
        let name = prop_oneof!["[a-z-]{1,8}", any::<String>()];
        let value = prop::collection::vec(any::<u8>(), 0..8);
        (
            prop_oneof![Just(0), Just(99), Just(600), Just(1000), any::<i16>()],
            prop::collection::vec(name, 0..4),
            prop::collection::vec(value, 0..4),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_response_reads_back_from_its_columns(response in any_response()) {
            let ResponseColumns { status, names, values, body } = ResponseColumns::new(&response);
            prop_assert_eq!(response_from(status, names, values, body).ok(), Some(response));
        }

        #[test]
        fn any_columns_read_as_a_response_or_a_corrupt_row(
            (status, names, values) in any_columns(),
        ) {
            let count = (names.len(), values.len());
            match response_from(status, names, values, None) {
                Ok(response) => {
                    prop_assert!((100..=999).contains(&status));
                    prop_assert_eq!(response.status.as_u16(), status.unsigned_abs());
                    prop_assert_eq!(count.0, count.1);
                }
                Err(error) => prop_assert!(matches!(error, StoreError::Codec(_)), "{error}"),
            }
        }
    }
}
