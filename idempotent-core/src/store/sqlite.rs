//! A SQLite store (feature `sqlite`), on sqlx: durable records for a
//! service that runs on one machine, in one file (WAL mode,
//! `synchronous = FULL`).
//!
//! # Schema
//!
//! [`SqliteStore::migrate`] creates it, or your own migrations, from
//! [`SqliteStore::migration_sql`]; shown with the default table name:
//!
//! ```sql
#![doc = include_str!("sqlite/schema.sql")]
//! ```
//!
//! As in the PostgreSQL store, `expires_at` is the lease deadline while in
//! flight and the end of replay once completed; a row past it is free to be
//! claimed again. The completed response is kept as one blob in the
//! compact binary layout of [`Completed::encode`]. Several processes may
//! share the file: SQLite serializes writers. A claim first reads the key
//! (replays and in-flight duplicates stop there, without a lock); only a key
//! with no live record is claimed, by one `INSERT ... ON CONFLICT DO UPDATE
//! ... WHERE` the row's deadline passed, so that SQLite's write lock is held
//! for that statement alone.
//!
//! The file must stay where it is while the store runs. One deleted or
//! replaced under it (a cleanup script, a backup restored by moving it into
//! place, a symbolic link on its path pointed at another file) is still
//! read and written by the connections SQLite has open, while a process
//! that opens the path uses another: the store then refuses every
//! operation ([`StoreError::Misconfigured`]) until it is restarted.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use tokio_util::task::TaskTracker;

mod connections;

use connections::Connections;

use super::sql::{self, DEFAULT_TABLE, InvalidTableName, Reaper, from_sql_millis, to_sql_millis};
use super::{Explained, Store, StoreError};
use crate::clock::{Clock, SharedClock, SystemClock, millis};
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};

const SCHEMA: &str = include_str!("sqlite/schema.sql");
/// The largest record blob kept: SQLite refuses a string, a blob or a
/// whole row over `SQLITE_MAX_LENGTH` (1e9 bytes as sqlx builds it), so
/// room is left for the row's other columns.
const MAX_VALUE_BYTES: usize = 1_000_000_000 - (1 << 20);
/// How long a writer waits for another to finish before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// WAL with `FULL` syncs the log on every commit. With `NORMAL` it syncs
/// only at checkpoints, and a power loss or an OS crash can roll back the
/// last commits: a claim or a response the application already acted on
/// would be gone, and the retry after the reboot would run its handler a
/// second time.
const SYNCHRONOUS: SqliteSynchronous = SqliteSynchronous::Full;
/// The size the WAL file is cut back to when a checkpoint lets it start
/// over. SQLite otherwise keeps the file at the largest size it ever
/// reached: a reader that held an old snapshot while writes went on (a
/// replay of a large record, a backup) leaves the WAL tens of megabytes
/// long for good. Normal use, with a checkpoint every 1000 pages (4 MiB),
/// stays under it, so a busy store does not shrink and regrow its log.
const JOURNAL_SIZE_LIMIT: u64 = 16 << 20;

/// A [`Store`] in a SQLite database file.
///
/// ```no_run
/// use idempotent_core::{Idempotency, store::SqliteStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = SqliteStore::open("idempotency.db").await?;
/// store.migrate().await?;
/// let _reaper = store.spawn_reaper(std::time::Duration::from_secs(60));
/// let idempotency = Idempotency::new(store);
/// # let _ = idempotency;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    connections: Connections,
    clock: SharedClock,
    table: String,
    sql: Statements,
    /// Claims run on tasks of their own, and releases of those nobody
    /// waits for, for [`Store::settle`].
    background: TaskTracker,
    /// The file the connections opened; `None` inside for an in-memory
    /// database. Learnt at the first operation of a store built on a pool.
    file: OnceLock<Option<DatabaseFile>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.inner.table)
            .finish_non_exhaustive()
    }
}

/// Builds a [`SqliteStore`] on an existing pool.
#[derive(Debug)]
#[must_use]
pub struct SqliteStoreBuilder {
    pool: SqlitePool,
    table: String,
    clock: SharedClock,
    hold_connections: Option<u32>,
}

impl SqliteStoreBuilder {
    /// The table to keep records in (default `idempotency_records`); may be
    /// schema-qualified, `schema.table`. Each part is quoted in SQL, so a
    /// reserved word (`order`, `user`) works.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The clock that decides leases and expiry (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How many of the pool's connections the store keeps checked out
    /// for its statements (default: half the pool's `max_connections`,
    /// rounded down, so a pool of one connection stays the application's;
    /// [`SqliteStore::open`] makes a pool of 4 and keeps 2). Capped at one
    /// less than the pool's size, so that the application, purges and
    /// migrations always have a connection: under steady traffic a kept
    /// connection is never unused long enough to go back.
    ///
    /// sqlx runs each SQLite connection on a thread of its own, and pings
    /// every connection given back to its pool: one more command, and two
    /// more thread wake-ups, per statement. A kept connection goes from
    /// one statement straight to the next. The store's statements then run
    /// on at most `connections` connections, waiting their turn in order,
    /// and the rest of the pool stays free for the application, migrations
    /// and purges. Kept connections go back to the pool after a second
    /// unused or a minute in all, after any error, and at once when the
    /// pool is closed. `0` runs every statement on a connection taken from
    /// the pool and given back after it.
    pub fn hold_connections(mut self, connections: u32) -> Self {
        self.hold_connections = Some(connections);
        self
    }

    /// Builds the store; call [`SqliteStore::migrate`] to create the table.
    ///
    /// # Errors
    /// The table name is not a plain SQL identifier, or names a
    /// temporary schema, whose tables are each connection's own.
    pub fn build(self) -> Result<SqliteStore, InvalidTableName> {
        sql::check_table_name(&self.table, is_temporary_schema)?;
        let sql = Statements::new(&sql::quoted(&self.table));
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                connections: Connections::new(self.pool, self.hold_connections),
                clock: self.clock,
                table: self.table,
                sql,
                background: TaskTracker::new(),
                file: OnceLock::new(),
            }),
        })
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode
    /// with `synchronous = FULL`: every commit (a claim, a completed
    /// response) is on disk before the store answers, so it survives a
    /// power loss or an OS crash, at the cost of an `fsync` of the log
    /// per write. To trade that for speed, open the pool yourself (with
    /// `SqliteSynchronous::Normal`) and give it to
    /// [`builder`](Self::builder).
    ///
    /// The pool has 4 connections, of which the store keeps 2 between
    /// statements (see [`SqliteStoreBuilder::hold_connections`]).
    ///
    /// `":memory:"` opens an in-memory database instead, for tests: the
    /// store keeps it on one connection, open until its pool is closed,
    /// since each connection to `:memory:` would have a database of its
    /// own.
    ///
    /// # Errors
    /// The file cannot be opened or created, or `path` is empty (SQLite
    /// would keep the records in a temporary file, gone at a restart).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::connect_with(SqliteConnectOptions::new().filename(path)).await
    }

    /// Opens a database by URL, `sqlite://<path>`, as [`open`](Self::open)
    /// does a path: in WAL mode with `synchronous = FULL`, and an in-memory
    /// one (`sqlite::memory:`) kept on one connection.
    ///
    /// # Errors
    /// The URL is invalid, not a `sqlite:` one, or names no file
    /// (`sqlite://`), or the file cannot be opened or created.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // sqlx reads a URL of another scheme (`postgres://...`) as a file
        // name, and would create that file.
        if !url.starts_with("sqlite:") {
            let cause = sqlx::Error::Configuration("not a SQLite URL".into());
            return Err(Explained::misconfigured(cause, URL_EXPECTED));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|error| Explained::misconfigured(error, URL_EXPECTED))?;
        Self::connect_with(options).await
    }

    /// Like [`open`](Self::open) and [`connect`](Self::connect), with
    /// connection options built in code (pragmas of your own, an
    /// extension, a VFS, ...). The store sets its own over those
    /// `options` hold, as `open` does: the file is created if missing, in
    /// WAL mode with `synchronous = FULL`, a 5 s busy timeout and a 16 MiB
    /// `journal_size_limit`. To choose other values of those, open the
    /// pool yourself and give it to [`builder`](Self::builder).
    ///
    /// ```no_run
    /// use idempotent_core::store::SqliteStore;
    /// use idempotent_core::sqlx::sqlite::SqliteConnectOptions;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = SqliteConnectOptions::new()
    ///     .filename("idempotency.db")
    ///     .pragma("cache_size", "-8192");
    /// let store = SqliteStore::connect_with(options).await?;
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// The file cannot be opened or created, or `options` name none (an
    /// empty file name, not in memory).
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let file = options.get_filename().to_owned();
        if names_no_file(&options) {
            return Err(StoreError::misconfigured(NoFileNamed));
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SYNCHRONOUS)
            .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT.to_string())
            .busy_timeout(BUSY_TIMEOUT);
        let main_file = while_busy(|| main_file(&options))
            .await
            .map_err(|error| open_error(error, &file))?;
        // sqlx pings a connection before lending it, by default: for
        // SQLite a round trip to the connection's own thread, which sleeps
        // between commands, and so two thread wake-ups, as many as the
        // statement itself costs. The ping only tells that this thread
        // still runs, which the statement tells as well (and the pool
        // pings every connection given back to it anyway).
        let pool_options = SqlitePoolOptions::new().test_before_acquire(false);
        let pool_options = if main_file.is_none() {
            // Each connection to `:memory:` opens a database of its own,
            // and a shared one (`sqlite::memory:`) is dropped with its last
            // connection: one connection, never closed, is the database.
            pool_options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            pool_options.max_connections(4)
        };
        let connect = || pool_options.clone().connect_with(options.clone());
        let pool = while_busy(connect)
            .await
            .map_err(|error| open_error(error, &file))?;
        let store = Self::builder(pool).build().map_err(StoreError::backend)?;
        let opened = main_file.and_then(|path| DatabaseFile::opened(&path, &file).ok());
        let _ = store.inner.file.set(opened);
        Ok(store)
    }

    /// Starts building a store on `pool`.
    ///
    /// The store runs no pragma of its own on `pool`: its connections keep
    /// the options they were opened with. [`open`](Self::open) uses WAL
    /// mode, `synchronous = FULL`, a 5 s busy timeout and a 16 MiB
    /// `journal_size_limit` (the WAL file shrinks back after a spike); a pool opened
    /// with `synchronous = NORMAL` instead skips the `fsync` on each
    /// commit, and a power loss or an OS crash can then roll back the last
    /// claims and responses, so their retries run the handler again:
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use idempotent_core::store::SqliteStore;
    /// // the `sqlx` the store is built on: no dependency of your own needed
    /// use idempotent_core::sqlx::sqlite::{
    ///     SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    /// };
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = SqliteConnectOptions::new()
    ///     .filename("idempotency.db")
    ///     .create_if_missing(true)
    ///     .journal_mode(SqliteJournalMode::Wal)
    ///     // Faster writes; the last commits may be lost to a power loss.
    ///     .synchronous(SqliteSynchronous::Normal)
    ///     .busy_timeout(Duration::from_secs(5));
    /// let pool = SqlitePoolOptions::new()
    ///     .max_connections(4)
    ///     // A statement tells as much as this ping, a round trip to the
    ///     // connection's thread, would.
    ///     .test_before_acquire(false)
    ///     .connect_with(options)
    ///     .await?;
    /// let store = SqliteStore::builder(pool).build()?;
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// A pool on an in-memory database must keep one connection open for
    /// good (`min_connections(1)`, no idle timeout, no maximum lifetime):
    /// the database, with every record, goes with its last connection.
    /// Its connections must also share the database, as those of
    /// `sqlite::memory:` do; `:memory:` as a file name (the default of
    /// `SqliteConnectOptions::new()`), or a plain name with `mode=memory`
    /// (`sqlite:records?mode=memory`), is each connection's own, and needs
    /// a pool of one connection (`max_connections(1)`).
    /// [`migrate`](SqliteStore::migrate) refuses a pool with a timeout, or
    /// of several connections each with a database of its own.
    pub fn builder(pool: SqlitePool) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            clock: Arc::new(SystemClock),
            hold_connections: None,
        }
    }

    /// Creates the table and its index if they do not exist. Safe to run on
    /// every start.
    ///
    /// # Errors
    /// The database refused (for example, a read-only file, or a schema
    /// that is not attached), or a table of the same name exists without
    /// the store's columns or its primary key on `(scope, key)` (made by
    /// something else), with a column the store leaves empty that is `NOT
    /// NULL` without a default, with `key` compared by a collation
    /// other than `BINARY` (`NOCASE`, `RTRIM`) or of numeric affinity,
    /// with `expires_at` of text or real affinity (declared `TEXT`,
    /// `REAL`), or with a unique index that two records can collide on
    /// (on `key` alone); or the database is in memory and the pool closes
    /// connections once idle or old, or has several connections each with
    /// an in-memory database of its own (see [`builder`](Self::builder)).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.check_memory_is_kept().await?;
        // Before anything reads the table through another connection than
        // the one that made it.
        self.check_memory_is_shared().await?;
        let schema = schema_for(&self.inner.table);
        let created =
            while_busy(|| sqlx::raw_sql(&schema).execute(self.inner.connections.pool())).await;
        // A table of the same name made by something else is kept by `IF
        // NOT EXISTS`, and its index fails on a column it lacks: either
        // way, what the table lacks is the error to tell.
        self.check_columns().await?;
        created.map_err(|error| self.migrate_error(error))?;
        self.check_writable().await
    }

    /// Refuses a database the store may not write (opened with `mode=ro`
    /// or `immutable=1`, a file the process may not write, which SQLite
    /// opens read-only without a word): `CREATE TABLE IF NOT EXISTS`
    /// writes nothing where the table exists, as at every restart, and
    /// every claim would fail after. A statement that deletes nothing
    /// still asks for the write lock, which SQLite refuses there.
    async fn check_writable(&self) -> Result<(), StoreError> {
        let probe = format!("DELETE FROM {} WHERE 0", sql::quoted(&self.inner.table));
        let pool = self.inner.connections.pool();
        while_busy(|| sqlx::query(&probe).execute(pool))
            .await
            .map(drop)
            .map_err(|error| self.migrate_error(error))
    }

    /// Refuses an in-memory database on a pool that closes connections
    /// once idle or old, as sqlx's pools do by default: the database goes
    /// with the last one, the table and every record with it, and each
    /// request after that would fail on a missing table, or run again.
    async fn check_memory_is_kept(&self) -> Result<(), StoreError> {
        let pool = self.inner.connections.pool();
        let options = pool.options();
        if options.get_idle_timeout().is_none() && options.get_max_lifetime().is_none() {
            return Ok(());
        }
        // A look that fails leaves it to the script to say why.
        match main_file_of(pool).await {
            Ok(None) => Err(StoreError::misconfigured(MemoryNotKept)),
            _ => Ok(()),
        }
    }

    /// Refuses an in-memory database that each connection of a pool of
    /// several opens for itself (`:memory:` as a file name, as
    /// `SqliteConnectOptions::new()` has it; a plain name with
    /// `mode=memory`, which SQLite shares only when a `file:` URI names
    /// it; `cache=private`): the table the script made, and every record
    /// after it, would be on one connection only. A statement run on
    /// another fails on a missing table, told to run `migrate`, which ran;
    /// a response stored through another connection than its claim's is
    /// refused, and its request runs again once the lease lapses. A table
    /// made on one of two connections held at once must show on the other.
    async fn check_memory_is_shared(&self) -> Result<(), StoreError> {
        let pool = self.inner.connections.pool();
        if pool.options().get_max_connections() < 2 {
            return Ok(());
        }
        // Looks that fail leave it to the statements to say why.
        if !matches!(main_file_of(pool).await, Ok(None)) {
            return Ok(());
        }
        let (Ok(mut first), Ok(mut second)) = (pool.acquire().await, pool.acquire().await) else {
            return Ok(());
        };
        // A name of its own, so that two stores migrating one database at
        // once do not take each other's probe.
        let probe = format!("idempotent_shared_probe_{:016x}", rand::random::<u64>());
        if run_on(&mut first, &format!("CREATE TABLE {probe} (x)"))
            .await
            .is_err()
        {
            return Ok(());
        }
        let seen = has_table(&mut second, &probe).await;
        let _ = run_on(&mut first, &format!("DROP TABLE {probe}")).await;
        match seen {
            Ok(false) => Err(StoreError::misconfigured(MemoryNotShared)),
            _ => Ok(()),
        }
    }

    /// The SQL [`migrate`](Self::migrate) runs to create `table` (as given
    /// to [`SqliteStoreBuilder::table`]) and its index, for migrations run
    /// by a tool of your own. `migrate` accepts the table it makes, so a
    /// service may still call it on every start.
    ///
    /// ```
    /// use idempotent_core::store::SqliteStore;
    ///
    /// let sql = SqliteStore::migration_sql("main.idempotency")?;
    /// assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"main\".\"idempotency\" ("));
    /// # Ok::<(), idempotent_core::store::InvalidTableName>(())
    /// ```
    ///
    /// # Errors
    /// The table name is one [`SqliteStoreBuilder::build`] refuses.
    pub fn migration_sql(table: &str) -> Result<String, InvalidTableName> {
        sql::check_table_name(table, is_temporary_schema)?;
        Ok(schema_for(table))
    }

    /// Refuses a table without the store's columns, or without its primary
    /// key, which every statement or every claim would fail on, and one
    /// whose columns or indexes would make claims fail or keys collide
    /// (see [`migrate`](Self::migrate)). Only names are compared, and
    /// the affinities of `key` and `expires_at`: SQLite keeps a value of
    /// any type in any column, converting it only by the column's
    /// affinity.
    async fn check_columns(&self) -> Result<(), StoreError> {
        let table = &self.inner.table;
        let (base, schema) = pragma_names(table);
        let schema = schema.as_deref();
        let found: Vec<(String, String)> =
            match sqlx::query_as("SELECT name, type FROM pragma_table_info(?1, ?2)")
                .bind(&base)
                .bind(schema)
                .fetch_all(self.inner.connections.pool())
                .await
            {
                Ok(found) => found,
                // An unknown schema: the script says so.
                Err(_) => return Ok(()),
            };
        sql::check_columns(table, &found, (COLUMNS, false), "SqliteStore")?;
        if found.is_empty() {
            return Ok(());
        }
        check_key_affinity(table, &found)?;
        check_deadline_affinity(table, &found)?;
        // Looks that fail leave it to the statements to say why.
        let required = self.required_columns(&base, schema).await;
        sql::check_required(table, &required.unwrap_or_default(), "SqliteStore")?;
        let folding = self.key_collation(&base, schema).await;
        sql::check_key_collation(table, folding.ok().flatten().as_deref(), "SqliteStore")?;
        // A unique index the claim's `ON CONFLICT (scope, key)` can use:
        // on those two columns alone, for every row.
        let keyed: Result<i64, _> = sqlx::query_scalar(
            "SELECT EXISTS (
                SELECT 1 FROM pragma_index_list(?1, ?2) AS list
                WHERE list.\"unique\" AND NOT list.partial
                  AND (SELECT count(*) FROM pragma_index_info(list.name, ?2)) = 2
                  AND (SELECT count(*) FROM pragma_index_info(list.name, ?2)
                       WHERE lower(name) IN ('scope', 'key')) = 2
            )",
        )
        .bind(&base)
        .bind(schema)
        .fetch_one(self.inner.connections.pool())
        .await;
        sql::check_key(table, !matches!(keyed, Ok(0)), "SqliteStore")?;
        let colliding = self.colliding_index(&base, schema, &found).await;
        sql::check_unique_indexes(table, colliding.ok().flatten().as_deref(), "SqliteStore")
    }

    /// A unique index of the table `base` in `schema`, of the `found`
    /// columns, that two records can collide on (see [`can_collide`]).
    async fn colliding_index(
        &self,
        base: &str,
        schema: Option<&str>,
        found: &[(String, String)],
    ) -> Result<Option<String>, sqlx::Error> {
        // `cid` -1 is the rowid, -2 an expression, neither with a name.
        let rows: Vec<(String, bool, i64, Option<String>)> = sqlx::query_as(
            "SELECT list.name, list.partial, x.cid, x.name
             FROM pragma_index_list(?1, ?2) AS list, pragma_index_info(list.name, ?2) AS x
             WHERE list.\"unique\"
             ORDER BY list.seq, x.seqno",
        )
        .bind(base)
        .bind(schema)
        .fetch_all(self.inner.connections.pool())
        .await?;
        let own: Vec<&str> = (found.iter())
            .map(|(name, _)| name.as_str())
            .filter(|name| !is_stores(name))
            .collect();
        for index in unique_indexes(rows) {
            let mut used = Vec::new();
            if index.partial || index.keys.contains(&Key::Expression) {
                // No pragma names the columns an expression or a
                // predicate uses: its `CREATE INDEX` text does.
                let text = self.index_sql(&index.name, schema).await?;
                used = (own.iter())
                    .filter(|column| mentions(&text, column))
                    .map(|column| (*column).to_owned())
                    .collect();
            }
            if can_collide(&index.keys, &used) {
                return Ok(Some(index.name));
            }
        }
        Ok(None)
    }

    /// The `CREATE INDEX` statement of the index `name` in `schema` (the
    /// main one when none is named), empty for one a constraint made.
    async fn index_sql(&self, name: &str, schema: Option<&str>) -> Result<String, sqlx::Error> {
        let look = format!(
            "SELECT sql FROM {}.sqlite_master WHERE type = 'index' AND name = ?1",
            sql::quoted(schema.unwrap_or("main"))
        );
        let found: Option<Option<String>> = sqlx::query_scalar(&look)
            .bind(name)
            .fetch_optional(self.inner.connections.pool())
            .await?;
        Ok(found.flatten().unwrap_or_default())
    }

    /// The columns of the table `base` in `schema` that a row must have a
    /// value in and SQLite does not make: `NOT NULL` without a default,
    /// other than a rowid's alias (a rowid table's one `INTEGER PRIMARY
    /// KEY`). Generated columns are not listed by `pragma_table_info`.
    async fn required_columns(
        &self,
        base: &str,
        schema: Option<&str>,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT name FROM pragma_table_info(?1, ?2) AS c
             WHERE c.\"notnull\" AND c.dflt_value IS NULL
               AND NOT (c.pk AND upper(c.type) = 'INTEGER'
                        AND (SELECT count(*) FROM pragma_table_info(?1, ?2) WHERE pk) = 1
                        AND NOT EXISTS (SELECT 1 FROM pragma_index_list(?1, ?2)
                                        WHERE origin = 'pk'))",
        )
        .bind(base)
        .bind(schema)
        .fetch_all(self.inner.connections.pool())
        .await
    }

    /// What compares `key` other than byte for byte, if anything: a unique
    /// index's collation, by name, or else the column's own (which the
    /// statements' `key = ?` compares by), found by comparing `'a'` with
    /// `'A'` and `'a '` as the column would, since no pragma names it.
    async fn key_collation(
        &self,
        base: &str,
        schema: Option<&str>,
    ) -> Result<Option<String>, sqlx::Error> {
        let indexed: Option<String> = sqlx::query_scalar(
            "SELECT x.coll FROM pragma_index_list(?1, ?2) AS list,
                                pragma_index_xinfo(list.name, ?2) AS x
             WHERE list.\"unique\" AND x.key AND lower(x.name) = 'key'
               AND upper(x.coll) <> 'BINARY'
             LIMIT 1",
        )
        .bind(base)
        .bind(schema)
        .fetch_optional(self.inner.connections.pool())
        .await?;
        if let Some(collation) = indexed {
            return Ok(Some(format!("the collation {collation} of a unique index")));
        }
        // The compound's column takes its collation from its first
        // `SELECT`, which yields no row, and its value from the second.
        let probe = format!(
            "SELECT EXISTS (SELECT 1 FROM (SELECT key AS k FROM {table} WHERE 0 UNION ALL SELECT 'a')
                            WHERE k = 'A' OR k = 'a ')",
            table = sql::quoted(&self.inner.table)
        );
        let folds: bool = sqlx::query_scalar(&probe)
            .fetch_one(self.inner.connections.pool())
            .await?;
        Ok(folds.then(|| "the column's collation, which is not BINARY".to_owned()))
    }

    /// Deletes every completed record whose replay window has passed, and
    /// every claim whose lease lapsed a minute or more ago; returns how
    /// many. Claims already treat such rows as absent, so this only frees
    /// space. A claim whose lease lapsed more recently stays: nobody took
    /// it over, so its holder, whose renewals may have been held up for a
    /// moment, still holds it and may complete it, and its response is
    /// then replayed.
    ///
    /// Rows go a thousand at a time, one statement each: SQLite has one
    /// write lock for the whole file, and a single statement over a large
    /// backlog would hold it, and keep every claim waiting for it, until
    /// the last row was gone.
    ///
    /// # Errors
    /// The database failed.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.check_file().await?;
        let (now, lapsed) = sql::purge_deadlines(self.inner.clock.now_millis());
        sql::purge_in_batches(|| async move {
            let deleted = sqlx::query(&self.inner.sql.purge)
                .bind(now)
                .bind(sql::PURGE_BATCH)
                .bind(lapsed)
                .execute(self.inner.connections.pool())
                .await
                .map_err(|error| self.statement_error(error))?;
            Ok(deleted.rows_affected())
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
    pub fn pool(&self) -> &SqlitePool {
        self.inner.connections.pool()
    }

    /// Runs `statement` on one of the store's connections (see
    /// [`connections`]); a failure, to lease one or of the statement, is
    /// reported as [`statement_error`](Self::statement_error) says.
    async fn on_connection<T>(
        &self,
        statement: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        (self.inner.connections.run(statement).await).map_err(|error| self.statement_error(error))
    }

    /// The table records live in, as it was configured: the statements
    /// quote it (see [`SqliteStoreBuilder::table`]), so SQL of your own
    /// that names it must quote a reserved word too.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_millis()
    }

    /// Refuses to go on once the file the connections opened is no longer
    /// at its path (deleted, or replaced by a restored backup): SQLite in
    /// WAL mode goes on reading and writing the old file without a word,
    /// while a process that opens the path, or a new connection of the
    /// pool, uses another, and a key would run once in each. One `stat`
    /// per operation (two for a path through a symbolic link), as SQLite
    /// itself does before each write out of WAL mode.
    async fn check_file(&self) -> Result<(), StoreError> {
        let opened = match self.inner.file.get() {
            Some(opened) => opened,
            None => {
                // The statement that follows says what is wrong.
                let Ok(path) = main_file_of(self.inner.connections.pool()).await else {
                    return Ok(());
                };
                let options = self.inner.connections.pool().connect_options();
                let given = options.get_filename();
                let opened = path.and_then(|path| DatabaseFile::opened(&path, given).ok());
                self.inner.file.get_or_init(|| opened)
            }
        };
        match opened {
            Some(file) if !file.is_in_place() => Err(StoreError::misconfigured(FileMoved {
                path: file.shown().display().to_string(),
            })),
            _ => Ok(()),
        }
    }

    /// Inserts the claim, or takes over a row whose deadline passed:
    /// `false` when the key has a live record. One statement, so SQLite's
    /// write lock is held only while it runs, not across the round trips
    /// of a transaction; a live row is read afterwards, without the lock.
    async fn try_acquire(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
        token: LeaseToken,
    ) -> Result<bool, StoreError> {
        self.check_file().await?;
        let now = self.now();
        let written = self
            .on_connection(async |connection| {
                sqlx::query(&self.inner.sql.claim)
                    .bind(key.scope.as_bytes().as_slice())
                    .bind(key.key.as_str())
                    .bind(fingerprint.as_bytes().as_slice())
                    .bind(token.to_bytes().as_slice())
                    .bind(to_sql_millis(now.saturating_add(millis(lease))))
                    .bind(to_sql_millis(now))
                    .execute(connection)
                    .await
            })
            .await?;
        Ok(written.rows_affected() > 0)
    }

    /// [`try_acquire`](Self::try_acquire) on a task of its own: SQLite
    /// commits an insert that was waiting for the write lock even after its
    /// caller stopped waiting for it (the engine's store timeout), and the
    /// key would then be held by a lease nobody has until it lapses. A
    /// claim nobody waits for any more is released instead.
    async fn acquire_detached(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
        token: LeaseToken,
    ) -> Result<bool, StoreError> {
        let (store, owned) = (self.clone(), key.clone());
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.inner.background.spawn(async move {
            let acquired = store.try_acquire(&owned, fingerprint, lease, token).await;
            if let Err(Ok(true)) = sender.send(acquired) {
                release_unanswered(&store, &owned, token).await;
            }
        });
        let mut waiting = Waiting {
            receiver,
            store: self,
            key,
            token,
            answered: false,
        };
        let acquired = (&mut waiting.receiver).await;
        waiting.answered = true;
        acquired.map_err(StoreError::backend)?
    }
}

/// Releases a claim whose caller stopped waiting for it; a failure is
/// told, since retries get 409 until its lease lapses.
async fn release_unanswered(store: &SqliteStore, key: &RecordKey, token: LeaseToken) {
    match Store::release(store, key, token).await {
        // A lost lease is not this claim's to release any more.
        Ok(()) | Err(StoreError::LeaseLost) => {}
        Err(error) => tracing::warn!(
            %error,
            key = %key.log_id(),
            "could not release a claim whose answer nobody read; it frees when its lease lapses"
        ),
    }
}

/// The caller's side of [`SqliteStore::acquire_detached`]; dropped before
/// its answer was read, it releases a claim the answer says was made.
struct Waiting<'a> {
    receiver: tokio::sync::oneshot::Receiver<Result<bool, StoreError>>,
    store: &'a SqliteStore,
    key: &'a RecordKey,
    token: LeaseToken,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.receiver.close();
        if let Ok(Ok(true)) = self.receiver.try_recv()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (store, key, token) = (self.store.clone(), self.key.clone(), self.token);
            let release = async move { release_unanswered(&store, &key, token).await };
            self.store.inner.background.spawn_on(release, &runtime);
        }
    }
}

/// `temp`, SQLite's schema of each connection's own tables.
fn is_temporary_schema(schema: &str) -> bool {
    schema == "temp"
}

/// The arguments the `pragma_*` table functions name `table` by: its
/// unqualified name and its schema, if it names one (none searches the
/// schemas in order, as the statements do).
fn pragma_names(table: &str) -> (String, Option<String>) {
    let base = sql::base_name(table);
    let qualifier = &table[..table.len() - base.len()];
    let schema = qualifier.strip_suffix('.').map(str::to_ascii_lowercase);
    (base.to_ascii_lowercase(), schema)
}

/// Runs the statement `sql`, used once, on `connection`.
async fn run_on(connection: &mut SqliteConnection, sql: &str) -> Result<(), sqlx::Error> {
    let statement = sqlx::query(sql).persistent(false);
    statement.execute(connection).await.map(drop)
}

/// Whether the database `connection` is on has the table `table`.
async fn has_table(connection: &mut SqliteConnection, table: &str) -> Result<bool, sqlx::Error> {
    let (base, schema) = pragma_names(table);
    let columns: i64 = sqlx::query_scalar("SELECT count(*) FROM pragma_table_info(?1, ?2)")
        .bind(base)
        .bind(schema)
        .fetch_one(connection)
        .await?;
    Ok(columns > 0)
}

/// The schema script for `table`, a name [`sql::check_table_name`]
/// accepted. SQLite names a schema on the index, never on the table it
/// indexes.
fn schema_for(table: &str) -> String {
    let base = sql::base_name(table);
    let qualifier = &table[..table.len() - base.len()];
    let index = sql::quoted(&format!("{qualifier}{base}_expires_at_idx"));
    // The index's names contain the default table name: swap them out first.
    SCHEMA
        .replace("idempotency_records_expires_at_idx", "\u{0}")
        .replace("ON idempotency_records", "ON \u{1}")
        .replace(DEFAULT_TABLE, &sql::quoted(table))
        .replace('\u{0}', &index)
        .replace('\u{1}', &sql::quoted(base))
}

/// What [`SqliteStore::connect`] takes.
const URL_EXPECTED: &str =
    "give a URL such as `sqlite://idempotency.db`, or a path to `SqliteStore::open`";

/// The columns the schema creates (types are not compared).
const COLUMNS: &[(&str, &str)] = &[
    ("scope", "BLOB"),
    ("key", "TEXT"),
    ("fingerprint", "BLOB"),
    ("lease_token", "BLOB"),
    ("expires_at", "INTEGER"),
    ("record", "BLOB"),
];

/// Whether `name` is one of the store's [`COLUMNS`].
fn is_stores(name: &str) -> bool {
    (COLUMNS.iter()).any(|(column, _)| column.eq_ignore_ascii_case(name))
}

/// A key column of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// A column of the table, by name (the rowid as `rowid`).
    Column(String),
    /// An expression.
    Expression,
}

/// A unique index, as `pragma_index_list` and `pragma_index_info` tell it.
#[derive(Debug)]
struct UniqueIndex {
    name: String,
    /// Whether it has a `WHERE` clause.
    partial: bool,
    keys: Vec<Key>,
}

/// The unique indexes in `rows` of `(index, partial, cid, column name)`,
/// each index's rows together, in key order.
fn unique_indexes(rows: Vec<(String, bool, i64, Option<String>)>) -> Vec<UniqueIndex> {
    let mut indexes: Vec<UniqueIndex> = Vec::new();
    for (name, partial, cid, column) in rows {
        let key = match (cid, column) {
            (-1, _) => Key::Column("rowid".to_owned()),
            (_, Some(column)) => Key::Column(column),
            (_, None) => Key::Expression,
        };
        match indexes.last_mut() {
            Some(last) if last.name == name => last.keys.push(key),
            _ => indexes.push(UniqueIndex {
                name,
                partial,
                keys: vec![key],
            }),
        }
    }
    indexes
}

/// Whether two records can collide on a unique index with `keys` whose
/// expressions and predicate use the user's own columns `used`:
/// - not when it holds a column of the user's own, as a key or in an
///   expression or its predicate: whatever fills that column decides;
/// - not when its keys hold both `scope` and `key`, which are distinct
///   for every two records;
/// - not when its keys hold `lease_token`: a token is random and one
///   claim's own, a stored response empties it, and SQLite counts NULLs
///   as distinct;
/// - otherwise they can (`key` alone, an expression of the store's
///   columns, `fingerprint`, which two requests alike share).
fn can_collide(keys: &[Key], used: &[String]) -> bool {
    let has = |name: &str| {
        keys.iter()
            .any(|key| matches!(key, Key::Column(column) if column.eq_ignore_ascii_case(name)))
    };
    let owns_a_column = !used.is_empty()
        || (keys.iter()).any(|key| matches!(key, Key::Column(column) if !is_stores(column)));
    !(owns_a_column || (has("scope") && has("key")) || has("lease_token"))
}

/// Whether the `CREATE INDEX` statement `text` names `column` after its
/// first parenthesis (past the index's and table's names), outside string
/// literals, in any case and with or without quotes.
fn mentions(text: &str, column: &str) -> bool {
    let Some((_, columns)) = text.split_once('(') else {
        return false;
    };
    // Every other piece between single quotes is a literal; a doubled
    // quote inside one splits it into two literals around nothing.
    let unquoted = columns.split('\'').step_by(2);
    unquoted
        .flat_map(|piece| {
            piece.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        })
        .any(|word| word.eq_ignore_ascii_case(column))
}

/// Refuses a `key` column, among the table's `(name, declared type)`
/// columns, that SQLite gives numeric affinity (its declared type names
/// no text or blob): SQLite keeps a key that looks like a number as that
/// number, and compares a key sent with it as one, so `0123`, `123` and
/// `123.0` would be one key, each request answered with the response
/// stored for another.
fn check_key_affinity(table: &str, columns: &[(String, String)]) -> Result<(), StoreError> {
    let Some(declared) = declared_type(columns, "key") else {
        return Ok(());
    };
    if matches!(affinity(declared), Affinity::Text | Affinity::Blob) {
        return Ok(());
    }
    let problems = format!(
        "`key` is declared `{declared}`, which gives it numeric affinity: SQLite keeps a key that looks like a number as that number, so `0123`, `123` and `123.0` are one key, and one request would be answered with the response stored for another; declare it `TEXT`"
    );
    Err(sql::foreign_table(table, problems, "SqliteStore"))
}

/// Refuses an `expires_at` column, among the table's `(name, declared
/// type)` columns, that SQLite gives text or real affinity (declared
/// `TEXT`, `VARCHAR`, `REAL`, `DOUBLE`, ...): SQLite converts each
/// deadline the store writes, an integer of Unix milliseconds, to text or
/// to a floating-point number, which no record is read back from (every
/// retry of a completed request, and every duplicate of one running,
/// would be answered 500 `record-corrupt`), and text compares with the
/// store's times as text, not as numbers.
fn check_deadline_affinity(table: &str, columns: &[(String, String)]) -> Result<(), StoreError> {
    let Some(declared) = declared_type(columns, "expires_at") else {
        return Ok(());
    };
    let kept_as = match affinity(declared) {
        Affinity::Text => "text, compared with the store's times as text",
        Affinity::Real => "a floating-point number",
        Affinity::Integer | Affinity::Numeric | Affinity::Blob => return Ok(()),
    };
    let problems = format!(
        "`expires_at` is declared `{declared}`, under which SQLite keeps each deadline the store writes (an integer of Unix milliseconds) as {kept_as}: the store reads no record back from it, and every retry of a completed request would be answered 500; declare it `INTEGER`"
    );
    Err(sql::foreign_table(table, problems, "SqliteStore"))
}

/// The declared type of the column `name` among `columns`, `(name,
/// declared type)`, if there is such a column.
fn declared_type<'c>(columns: &'c [(String, String)], name: &str) -> Option<&'c str> {
    (columns.iter())
        .find(|(column, _)| column.eq_ignore_ascii_case(name))
        .map(|(_, declared)| declared.as_str())
}

/// The type affinity SQLite gives a column, which decides what it
/// converts a value stored in it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

/// The affinity of a column of the `declared` type, by the rules of
/// SQLite's documentation (section 3.1 of "Datatypes In SQLite"), in
/// their order: `INT` gives integer affinity, whatever else the type
/// holds; then `CHAR`, `CLOB` or `TEXT` text affinity; `BLOB`, or no
/// type, blob affinity; `REAL`, `FLOA` or `DOUB` real affinity; any
/// other numeric affinity.
fn affinity(declared: &str) -> Affinity {
    let declared = declared.to_ascii_uppercase();
    let holds = |words: &[&str]| words.iter().any(|word| declared.contains(word));
    if holds(&["INT"]) {
        Affinity::Integer
    } else if holds(&["CHAR", "CLOB", "TEXT"]) {
        Affinity::Text
    } else if declared.is_empty() || holds(&["BLOB"]) {
        Affinity::Blob
    } else if holds(&["REAL", "FLOA", "DOUB"]) {
        Affinity::Real
    } else {
        Affinity::Numeric
    }
}

/// SQLite's primary result code, the low byte of an extended one.
fn result_code(error: &sqlx::Error) -> Option<i32> {
    let code = sql::error_code(error)?.parse::<i32>().ok()?;
    Some(code & 0xff)
}

/// Why the file at `file` could not be opened, with what to do: SQLite
/// says only "unable to open database file", without the path or why.
fn open_error(error: sqlx::Error, file: &Path) -> StoreError {
    let path = file.display();
    // sqlx refuses, before SQLite sees it, a name that is not UTF-8 or
    // holds a NUL byte: it never opens.
    if let sqlx::Error::Io(io) = &error
        && io.kind() == std::io::ErrorKind::InvalidData
    {
        let hint = format!(
            "SQLite takes a file name of UTF-8 without NUL bytes, which `{path}` is not: name another file"
        );
        return Explained::misconfigured(error, hint);
    }
    let hint = match result_code(&error) {
        // SQLITE_CANTOPEN
        Some(14) => cannot_open(file),
        // SQLITE_NOTADB
        Some(26) => {
            format!("`{path}` is not a SQLite database: name a new file, or the store's database")
        }
        // SQLITE_BUSY, after the busy timeout: another connection keeps
        // the file locked, which may end by itself.
        Some(5) => {
            let hint = format!(
                "another process has kept `{path}` locked for {}s (a connection in `locking_mode = EXCLUSIVE`, or a transaction left open): stop it, or give the store a file of its own",
                BUSY_TIMEOUT.as_secs()
            );
            return Explained::store_error(error, hint);
        }
        // SQLITE_READONLY
        Some(8) => format!("`{path}` is read-only: {READ_ONLY_FIX}"),
        _ => {
            return Explained::store_error(error, format!("opening the SQLite database `{path}`"));
        }
    };
    Explained::misconfigured(error, hint)
}

/// Why SQLite could not open the file at `file` (`SQLITE_CANTOPEN`), with
/// what to do.
fn cannot_open(file: &Path) -> String {
    let path = file.display();
    if file.is_dir() {
        return format!("`{path}` is a directory: name a file in it");
    }
    match file
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        Some(parent) if !parent.is_dir() => {
            format!(
                "the directory `{}` does not exist: create it first",
                parent.display()
            )
        }
        _ => format!(
            "check that the process may read and write `{path}` and its directory, where SQLite creates the `-wal` and `-shm` files beside it"
        ),
    }
}

/// What to do about a damaged database, or one overwritten in place.
const DAMAGED_FIX: &str = "stop the processes that use it and restore it from a backup (`sqlite3 .recover` saves what it can), or move it away with its `-wal` and `-shm` files for a new one, where the requests it recorded run again";

/// What to do about a database the store may not write.
const READ_ONLY_FIX: &str = "the store writes on every request; let the process write the file and its directory (SQLite creates its `-wal` and `-shm` files beside it), keep it off read-only mounts, and open it without `mode=ro` or `immutable=1` (read-only media to SQLite, which then also ignores other processes' writes in the `-wal` file)";

impl SqliteStore {
    /// A statement's failure as the engine reports it: a missing table,
    /// one made by something else, a file that cannot be opened, a
    /// read-only, damaged or overwritten file is named as such, with the
    /// fix, since such a service fails every request until it is fixed;
    /// a full disk, or a file another connection keeps locked, is told
    /// as the outage it is, with the file.
    fn statement_error(&self, error: sqlx::Error) -> StoreError {
        let options = self.inner.connections.pool().connect_options();
        let path = options.get_filename().display().to_string();
        statement_error(error, &path, &self.inner.table)
    }

    /// Why [`SqliteStore::migrate`] failed, with what to do about it.
    fn migrate_error(&self, error: sqlx::Error) -> StoreError {
        let table = &self.inner.table;
        let unknown_schema = error
            .as_database_error()
            .is_some_and(|error| error.message().starts_with("unknown database"));
        if unknown_schema {
            let hint = format!(
                "the schema of the table `{table}` is not attached: attach that database on every connection of the pool, or name the table without a schema"
            );
            return Explained::misconfigured(error, hint);
        }
        self.statement_error(error)
    }
}

/// [`SqliteStore::statement_error`], for the database file at `path`
/// and the store's table `table`.
fn statement_error(error: sqlx::Error, path: &str, table: &str) -> StoreError {
    let message = error
        .as_database_error()
        .map(|error| error.message().to_owned())
        .unwrap_or_default();
    let hint = if message.starts_with("no such table") {
        format!(
            "the table `{table}` does not exist in `{path}` (never created, or dropped or renamed since): create it with `SqliteStore::migrate()` when the service starts"
        )
    } else if message.starts_with("no such column")
        || message.contains("has no column named")
        || message.starts_with("ON CONFLICT clause does not match")
    {
        format!(
            "the table `{table}` does not have the columns and primary key `SqliteStore::migrate()` creates (altered since, or a table of the same name made by something else?): `SqliteStore::migrate()` names what differs; give it back the shape of `SqliteStore::migration_sql(\"{table}\")`, or give the store a table of its own with `SqliteStoreBuilder::table(...)`"
        )
    } else if result_code(&error) == Some(19) {
        // SQLITE_CONSTRAINT: no row the store writes breaks a constraint
        // of the table `migrate` makes (its claim resolves the primary
        // key's conflicts), and every such row breaks it alike.
        format!(
            "the table `{table}` refuses the store's rows, as none made by `SqliteStore::migrate()` does: a constraint or index was added since (a NOT NULL column without a default, a CHECK, a foreign key, a unique index other than on (`scope`, `key`)); drop it, or give the column a default"
        )
    } else if result_code(&error) == Some(8) {
        format!("the database `{path}` is read-only: {READ_ONLY_FIX}")
    } else if result_code(&error) == Some(11) {
        // SQLITE_CORRUPT: the file stays damaged until it is replaced.
        format!(
            "the database `{path}` is damaged (a failing disk, a copy taken while it was written, a file overwritten in place): {DAMAGED_FIX}"
        )
    } else if result_code(&error) == Some(14) {
        // SQLITE_CANTOPEN, from a connection the pool opens now: a pool
        // connected lazily, or one reopening connections it closed.
        format!(
            "the database `{path}` cannot be opened: {}",
            cannot_open(Path::new(path))
        )
    } else if result_code(&error) == Some(26) {
        // SQLITE_NOTADB: its header overwritten since `open` read it; as
        // damaged as a malformed page, and as lasting.
        format!(
            "the database `{path}` is no longer a SQLite database (its header was overwritten in place: another file copied over it, a failing disk): {DAMAGED_FIX}"
        )
    } else if result_code(&error) == Some(13) {
        // SQLITE_FULL: may pass as space is freed, so retried as an outage.
        return Explained::store_error(error, DISK_FULL);
    } else if result_code(&error) == Some(5) {
        // SQLITE_BUSY, after the busy timeout: the lock may be let go.
        let hint = format!(
            "another connection kept `{path}` locked for longer than the busy timeout (a transaction left open, a connection in `locking_mode = EXCLUSIVE`, a long write by another program): if it lasts, end it, or give the store a file of its own"
        );
        return Explained::store_error(error, hint);
    } else {
        return StoreError::backend(error);
    };
    Explained::misconfigured(error, hint)
}

/// What to do about a full database (SQLITE_FULL): a full disk, or a
/// file at its `max_page_count`.
const DISK_FULL: &str = "the database file cannot grow: free space on the disk that holds it (or raise its `max_page_count`, if one is set)";

/// The file `options` open, as SQLite itself names it (a full path);
/// `None` for an in-memory database, one without a file (`:memory:`,
/// `sqlite::memory:`, `mode=memory`).
async fn main_file(options: &SqliteConnectOptions) -> Result<Option<PathBuf>, sqlx::Error> {
    let mut connection = SqliteConnection::connect_with(options).await?;
    let file = main_file_of(&mut connection).await?;
    connection.close().await?;
    Ok(file)
}

/// The file of the main database of whatever `executor` runs on.
async fn main_file_of<'e>(
    executor: impl sqlx::SqliteExecutor<'e>,
) -> Result<Option<PathBuf>, sqlx::Error> {
    let file: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(executor)
            .await?;
    Ok((!file.is_empty()).then(|| PathBuf::from(file)))
}

/// A database file, told apart from whatever is at its path later.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DatabaseFile {
    /// The file as SQLite names it: symbolic links resolved.
    path: PathBuf,
    /// The path the store was given, made absolute, where it differs from
    /// `path` and named the same file when the store opened it: it goes
    /// through a symbolic link, which can be pointed at another file
    /// while `path` stays in place.
    given: Option<PathBuf>,
    /// The device and inode numbers, where the platform has them.
    identity: Option<(u64, u64)>,
}

impl DatabaseFile {
    /// The file at `path` now.
    fn at(path: &Path) -> std::io::Result<Self> {
        let metadata = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
            given: None,
            identity: identity(&metadata),
        })
    }

    /// The file SQLite opened, which it names `opened`, reached through
    /// `given`, the path (or URI) the store was given.
    fn opened(opened: &Path, given: &Path) -> std::io::Result<Self> {
        let mut file = Self::at(opened)?;
        // A URI, or a relative path the process left since, names no file,
        // or another one: only `opened` is watched then.
        file.given = std::path::absolute(given)
            .ok()
            .filter(|given| *given != file.path && file.is_at(given) == Some(true));
        Ok(file)
    }

    /// The path errors name: the one the store was given.
    fn shown(&self) -> &Path {
        self.given.as_deref().unwrap_or(&self.path)
    }

    /// Whether `path` still names this file, and so does the path given,
    /// if any: a process that opens the path given opens this file. A path
    /// that cannot be looked at for another reason than its absence (a
    /// directory the process may not search) is given the benefit of the
    /// doubt: the statements say what is wrong with it.
    fn is_in_place(&self) -> bool {
        let named = |path: &Path| self.is_at(path).unwrap_or(true);
        named(&self.path) && self.given.as_deref().is_none_or(named)
    }

    /// Whether `path` names this file now; `None` when it cannot be told
    /// for another reason than the path's absence.
    fn is_at(&self, path: &Path) -> Option<bool> {
        match Self::at(path) {
            Ok(now) => Some(now.identity == self.identity),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Some(false),
            Err(_) => None,
        }
    }
}

#[cfg(unix)]
fn identity(metadata: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    Some((metadata.dev(), metadata.ino()))
}

#[cfg(not(unix))]
fn identity(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// An in-memory database on a pool that closes connections once idle or
/// old.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database is in memory, and goes, with the table and every record, when the pool closes its last connection, as this pool does once its connections are idle or old: build the pool with `min_connections(1)`, `idle_timeout(None)` and `max_lifetime(None)`, or open the store with `SqliteStore::open(\":memory:\")`"
)]
struct MemoryNotKept;

/// An in-memory database that each connection of a pool of several opens
/// for itself.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database is in memory, and each connection of the pool opens one of its own (`:memory:` as a file name, as `SqliteConnectOptions::new()` has it, a plain name with `mode=memory`, or `cache=private`): the table and every record would be on one connection only, a request served on another would fail on a missing table, and one whose response is stored through another than its claim's would run again; build the pool with `max_connections(1)` (with `min_connections(1)`, `idle_timeout(None)` and `max_lifetime(None)`), open the store with `SqliteStore::open(\":memory:\")`, or connect the pool to `sqlite::memory:`, which its connections share"
)]
struct MemoryNotShared;

/// An empty file name, and no in-memory database asked for.
#[derive(Debug, thiserror::Error)]
#[error(
    "no SQLite database file was named (an empty path or URL, as an unset variable gives): SQLite would keep the records in a temporary file of its own, deleted when the store closes, and each request would run again after a restart; name the file to keep them in (`SqliteStore::open(\"idempotency.db\")`), or `:memory:` for an in-memory database, for tests"
)]
struct NoFileNamed;

/// Whether `options` name no file and no in-memory database: SQLite then
/// opens a temporary file of each connection's own, deleted when it
/// closes, without a word.
fn names_no_file(options: &SqliteConnectOptions) -> bool {
    use sqlx::ConnectOptions as _;

    if !options.get_filename().as_os_str().is_empty() {
        return false;
    }
    // Only the URL tells `mode=memory`; sqlx cannot make one of every
    // file name (it panics on `file:` names), but does of an empty one.
    let url = options.to_url_lossy();
    !(url.query_pairs()).any(|(name, value)| name == "mode" && value == "memory")
}

/// The database file was deleted, renamed or replaced while the store had
/// it open.
#[derive(Debug, thiserror::Error)]
#[error(
    "the SQLite database `{path}` was deleted or replaced while the store had it open: its connections would go on with the old file, which a process that opens the path (one started since, or a new connection of this one) does not see, and each file would run a key once; restart every process that uses the file, after putting back the one it should use"
)]
struct FileMoved {
    path: String,
}

/// Runs `operation` again while SQLite answers "database is locked" at
/// once, for up to [`BUSY_TIMEOUT`]: processes that open a new file
/// together switch it to WAL and create its table at the same moment,
/// and SQLite does not wait on its busy timeout for every such lock.
async fn while_busy<T, F>(mut operation: impl FnMut() -> F) -> Result<T, sqlx::Error>
where
    F: Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match operation().await {
            Err(error) if is_busy(&error) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            outcome => return outcome,
        }
    }
}

/// Whether SQLite answered `SQLITE_BUSY` (or one of its extended codes).
fn is_busy(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(error) = error else {
        return false;
    };
    let code = error.code().and_then(|code| code.parse::<i32>().ok());
    code.is_some_and(|code| code & 0xff == 5)
}

/// The statements, with the table name spliced in once.
struct Statements {
    claim: String,
    renew: String,
    complete: String,
    release: String,
    get: String,
    purge: String,
}

impl Statements {
    fn new(table: &str) -> Self {
        Self {
            claim: format!(
                "INSERT INTO {table} (scope, key, fingerprint, lease_token, expires_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL)
                 ON CONFLICT (scope, key) DO UPDATE
                 SET fingerprint = excluded.fingerprint, lease_token = excluded.lease_token,
                     expires_at = excluded.expires_at, record = NULL
                 WHERE expires_at <= ?6"
            ),
            // A renewal applied after a later one leaves the later deadline.
            renew: format!(
                "UPDATE {table} SET expires_at = MAX(expires_at, ?4)
                 WHERE scope = ?1 AND key = ?2 AND lease_token = ?3"
            ),
            complete: format!(
                "UPDATE {table} SET lease_token = NULL, expires_at = ?4, record = ?5
                 WHERE scope = ?1 AND key = ?2 AND lease_token = ?3"
            ),
            release: format!(
                "DELETE FROM {table} WHERE scope = ?1 AND key = ?2 AND lease_token = ?3"
            ),
            get: format!(
                "SELECT fingerprint, lease_token, expires_at, record FROM {table}
                 WHERE scope = ?1 AND key = ?2 AND expires_at > ?3"
            ),
            // SQLite may be built without `DELETE ... LIMIT`, and the table
            // has no rowid: a batch is picked by its primary key. A claim
            // (`lease_token` set) goes only once its lease lapsed by
            // `?3`, a grace earlier than `?1`: its holder may still complete
            // it until then.
            purge: format!(
                "DELETE FROM {table}
                 WHERE (scope, key) IN (
                     SELECT scope, key FROM {table}
                     WHERE expires_at <= ?1 AND (lease_token IS NULL OR expires_at <= ?3)
                     LIMIT ?2)"
            ),
        }
    }
}

impl sql::Purge for SqliteStore {
    fn purge_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        SqliteStore::purge_expired(self)
    }
}

impl Store for SqliteStore {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let token = LeaseToken::random();
        for _ in 0..sql::CLAIM_ATTEMPTS {
            // Replays and in-flight duplicates only read, concurrently with
            // other readers (WAL); only a key with no live record takes the
            // write lock. A live record the insert met is read on the next
            // turn; one that went away in between is claimed then.
            if let Some(record) = Store::get(self, key).await? {
                return Ok(record.into());
            }
            if self
                .acquire_detached(key, fingerprint, lease, token)
                .await?
            {
                return Ok(Claim::Acquired(token));
            }
        }
        Err(StoreError::backend(sql::Contended))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        let expires_at = to_sql_millis(self.now().saturating_add(millis(lease)));
        let updated = self
            .on_connection(async |connection| {
                sqlx::query(&self.inner.sql.renew)
                    .bind(key.scope.as_bytes().as_slice())
                    .bind(key.key.as_str())
                    .bind(token.to_bytes().as_slice())
                    .bind(expires_at)
                    .execute(connection)
                    .await
            })
            .await?;
        held(updated.rows_affected())
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        let expires_at = self.now().saturating_add(millis(ttl));
        // The fingerprint column is authoritative; the blob's copy is blank.
        let mut record = Completed {
            fingerprint: Fingerprint::from_bytes([0; 32]),
            response,
            expires_at,
        };
        record.fit(MAX_VALUE_BYTES);
        let updated = self
            .on_connection(async |connection| {
                sqlx::query(&self.inner.sql.complete)
                    .bind(key.scope.as_bytes().as_slice())
                    .bind(key.key.as_str())
                    .bind(token.to_bytes().as_slice())
                    .bind(to_sql_millis(expires_at))
                    .bind(record.encode().as_ref())
                    .execute(connection)
                    .await
            })
            .await?;
        held(updated.rows_affected())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.check_file().await?;
        let deleted = self
            .on_connection(async |connection| {
                sqlx::query(&self.inner.sql.release)
                    .bind(key.scope.as_bytes().as_slice())
                    .bind(key.key.as_str())
                    .bind(token.to_bytes().as_slice())
                    .execute(connection)
                    .await
            })
            .await?;
        held(deleted.rows_affected())
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.check_file().await?;
        let row = self
            .on_connection(async |connection| {
                sqlx::query(&self.inner.sql.get)
                    .bind(key.scope.as_bytes().as_slice())
                    .bind(key.key.as_str())
                    .bind(to_sql_millis(self.now()))
                    .fetch_optional(connection)
                    .await
            })
            .await?;
        let table = &self.inner.table;
        row.map(|row| record_from_row(&row, table)).transpose()
    }

    async fn settle(&self) {
        super::settle(&self.inner.background).await;
    }

    fn deadline_clock(&self) -> Option<SharedClock> {
        Some(self.inner.clock.clone())
    }
}

fn held(rows: u64) -> Result<(), StoreError> {
    if rows == 0 {
        Err(StoreError::LeaseLost)
    } else {
        Ok(())
    }
}

/// The record in `row` of the store's table `table`.
fn record_from_row(row: &SqliteRow, table: &str) -> Result<Record, StoreError> {
    // SQLite keeps a value of any type in any column: one of the wrong
    // type is an unreadable record, not a failure of the database.
    let row = sql::TableRow::new(row, table, "SqliteStore");
    let fingerprint = sql::fingerprint_from(&row.column::<Vec<u8>>("fingerprint")?)?;
    let expires_at = from_sql_millis(row.column("expires_at")?);
    if let Some(blob) = row.column::<Option<Vec<u8>>>("record")? {
        let mut completed = Completed::decode(Bytes::from(blob))?;
        completed.fingerprint = fingerprint;
        completed.expires_at = expires_at;
        return Ok(Record::Completed(Arc::new(completed)));
    }
    sql::in_flight(fingerprint, row.column("lease_token")?, expires_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(names: &[&str]) -> Vec<Key> {
        (names.iter())
            .map(|name| match *name {
                "" => Key::Expression,
                name => Key::Column(name.to_owned()),
            })
            .collect()
    }

    #[test]
    fn indexes_records_can_collide_on() {
        for keys in [
            &["key"][..],
            &["scope", ""],
            &["fingerprint"],
            &[""],
            &["Key"],
        ] {
            assert!(can_collide(&columns(keys), &[]), "{keys:?}");
        }
    }

    #[test]
    fn indexes_records_never_collide_on() {
        for keys in [
            &["scope", "key"][..],
            &["KEY", "fingerprint", "Scope"],
            &["lease_token"],
            &["tenant", "key"],
            &["rowid"],
        ] {
            assert!(!can_collide(&columns(keys), &[]), "{keys:?}");
        }
        let tenant = ["tenant".to_owned()];
        assert!(!can_collide(&columns(&[""]), &tenant));
    }

    #[test]
    fn affinities_follow_sqlites_rules_in_their_order() {
        for (declared, expected) in [
            ("INTEGER", Affinity::Integer),
            ("BIGINT", Affinity::Integer),
            // `INT` comes first, even inside `POINT`.
            ("FLOATING POINT", Affinity::Integer),
            ("VARCHAR(255)", Affinity::Text),
            ("clob", Affinity::Text),
            ("CHARINT", Affinity::Integer),
            ("BLOB", Affinity::Blob),
            ("", Affinity::Blob),
            ("REAL", Affinity::Real),
            ("DOUBLE PRECISION", Affinity::Real),
            ("FLOAT", Affinity::Real),
            ("NUMERIC", Affinity::Numeric),
            ("DATETIME", Affinity::Numeric),
            ("STRING", Affinity::Numeric),
        ] {
            assert_eq!(affinity(declared), expected, "{declared}");
        }
    }

    #[test]
    fn mentions_finds_names_outside_literals_and_the_indexs_own_name() {
        let on_tenant = "CREATE UNIQUE INDEX tenant_idx ON records (lower(\"Tenant\"))";
        assert!(mentions(on_tenant, "tenant"));
        assert!(mentions(
            "CREATE UNIQUE INDEX i ON r (key) WHERE tenant > 0",
            "tenant"
        ));
        for text in [
            "CREATE UNIQUE INDEX tenant ON records (lower(key))",
            "CREATE UNIQUE INDEX i ON records (coalesce(key, 'tenant'))",
            "CREATE UNIQUE INDEX i ON records (coalesce(key, 'it''s tenant'))",
            "CREATE UNIQUE INDEX i ON records (lower(tenants))",
            "",
        ] {
            assert!(!mentions(text, "tenant"), "{text}");
        }
    }
}
