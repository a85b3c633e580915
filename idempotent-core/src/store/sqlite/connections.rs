//! Connections the SQLite store keeps checked out of its pool between
//! statements.
//!
//! sqlx runs each SQLite connection on a thread of its own, which sleeps
//! until it is sent a command; every command costs two thread wake-ups,
//! the connection's and the waiting task's, far more CPU than SQLite
//! spends reading a row. sqlx's pool also pings every connection given
//! back to it, one more command, and gives it back on a task spawned for
//! that: a statement run on a connection from the pool costs two commands
//! where one is the statement. The store therefore keeps some of the
//! connections it took from the pool in a small pool of its own
//! (deadpool; its statements wait their turn there, in order) and hands a
//! connection that finished its statement cleanly straight to the next
//! statement. The rest of the sqlx pool stays free for everything else.
//!
//! Only a clean finish keeps a connection: one whose statement failed, or
//! whose future was dropped mid-statement (a timeout, a client gone), goes
//! back to the sqlx pool, whose ping tells whether its thread still runs.
//! Kept connections go back to the sqlx pool as the `kept` module says.

use std::sync::Arc;

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use sqlx::Sqlite;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnection, SqlitePool};

use crate::store::kept::{Checked, Kept};

/// The store's connections: kept ones, or straight from the sqlx pool.
pub(super) struct Connections {
    pool: SqlitePool,
    /// `None` when connections are not kept (or deadpool refused its
    /// settings, which cannot happen without timeouts).
    kept: Option<Arc<Kept<Checkout>>>,
}

/// deadpool's manager: its objects are connections checked out of the
/// sqlx pool.
struct Checkout {
    pool: SqlitePool,
}

/// A connection lent to one statement; see [`Lease::finish`]. Dropped
/// unfinished, a kept one is not reused (see [`Connections::lease`]).
struct Lease(Leased);

enum Leased {
    Kept(Object<Checkout>),
    Pooled(PoolConnection<Sqlite>),
}

impl Connections {
    /// Connections from `pool`, keeping up to `hold` of them (default:
    /// half the pool, rounded down, so a pool of one connection, as an
    /// in-memory database has, stays the application's; at most all but
    /// one); `0` returns each one to the pool after its statement, as sqlx
    /// does by itself.
    pub(super) fn new(pool: SqlitePool, hold: Option<u32>) -> Self {
        let size = pool.options().get_max_connections();
        // All but one at most, whatever was asked: under steady traffic no
        // kept connection sits unused for a second, and with every one
        // kept, the application's queries, purges and migrations would
        // wait out the pool's acquire timeout and fail.
        let hold = hold.unwrap_or(size / 2).min(size.saturating_sub(1));
        let checkout = Checkout { pool: pool.clone() };
        let kept = Kept::new(checkout, hold).map(Arc::new);
        Self { pool, kept }
    }

    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Runs `statement` on a leased connection and ends the lease with its
    /// outcome ([`Lease::finish`]). Statements reach a connection only
    /// here, so none can leave a kept connection unfinished, which would
    /// send it back to the sqlx pool and its ping.
    pub(super) async fn run<T>(
        &self,
        statement: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut lease = self.lease().await?;
        let outcome = statement(lease.connection()).await;
        lease.finish(outcome)
    }

    /// A connection for one statement: a kept one if any is free.
    async fn lease(&self) -> Result<Lease, sqlx::Error> {
        let Some(kept) = &self.kept else {
            return Ok(Lease(Leased::Pooled(self.pool.acquire().await?)));
        };
        Kept::start_sweeping(kept, &self.pool);
        let mut object = match kept.pool.get().await {
            Ok(object) => object,
            Err(managed::PoolError::Backend(error)) => return Err(error),
            // Closed by the sweeper: the sqlx pool was closed too, and
            // says so.
            Err(_) => return Ok(Lease(Leased::Pooled(self.pool.acquire().await?))),
        };
        // Set back by `finish`: a lease dropped before then is not reused.
        object.clean = false;
        Ok(Lease(Leased::Kept(object)))
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        Kept::drop_outside_runtime(&mut self.kept);
    }
}

impl managed::Manager for Checkout {
    type Type = Checked<PoolConnection<Sqlite>>;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Self::Type, sqlx::Error> {
        Ok(Checked::new(self.pool.acquire().await?))
    }

    async fn recycle(
        &self,
        checked: &mut Self::Type,
        metrics: &Metrics,
    ) -> RecycleResult<sqlx::Error> {
        // The sqlx pool's ping tells whether an unfinished one refused
        // still serves.
        checked.recycle(metrics)
    }
}

impl Lease {
    /// The connection, for one statement.
    fn connection(&mut self) -> &mut SqliteConnection {
        match &mut self.0 {
            Leased::Kept(object) => &mut object.connection,
            Leased::Pooled(connection) => connection,
        }
    }

    /// Ends the lease with the statement's outcome: a success keeps the
    /// connection for the next statement, a failure returns it to the
    /// sqlx pool.
    fn finish<T>(self, outcome: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        match (self.0, outcome) {
            (Leased::Kept(mut object), Ok(value)) => {
                object.clean = true;
                Ok(value)
            }
            (_, Ok(value)) => Ok(value),
            (Leased::Kept(object), Err(error)) => {
                // Out of the kept ones at once; dropped, it goes back to
                // the sqlx pool.
                drop(Object::take(object));
                Err(error)
            }
            (_, Err(error)) => Err(error),
        }
    }
}
