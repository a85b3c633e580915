//! Connections a SQL store keeps checked out of its sqlx pool between
//! statements, in a small deadpool of their own, and their return to the
//! sqlx pool: what `PostgresStore` and `SqliteStore` share. Each store's
//! `connections` module says why it keeps them and supplies the deadpool
//! manager that checks them out and decides which may be kept.
//!
//! Kept connections go back once idle for [`IDLE_RETURN`] or out for
//! [`MAX_HOLD`], so a pool shared with the application gets them back
//! after a burst and still sees every connection regularly (its lifetime
//! limits apply), and all of them at once when the sqlx pool is closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool::managed::{self, Manager, Metrics, RecycleError, RecycleResult};
use sqlx::pool::CloseEvent;
use tokio::runtime::Handle;

/// How long a kept connection may sit unused before it goes back to the
/// sqlx pool.
pub(crate) const IDLE_RETURN: Duration = Duration::from_secs(1);
/// How long a connection may stay out of the sqlx pool in all, however
/// busy.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(60);

/// Connections checked out of the sqlx pool and kept between statements.
pub(crate) struct Kept<M: Manager> {
    pub(crate) pool: managed::Pool<M>,
    /// Whether the task returning idle connections runs; it is started by
    /// the first statement, inside the runtime that runs the store.
    sweeping: AtomicBool,
}

/// A connection checked out of the sqlx pool (`C`, its `PoolConnection`),
/// whether its last statement finished, and the runtime of the last
/// statement it served: where it goes back to the sqlx pool when the
/// store is dropped outside any runtime ([`Kept::drop_outside_runtime`]).
/// Each its own, not one for the whole store: a store can outlive the
/// runtime it first ran in and go on in another, and a connection that
/// served there must go back there, the first runtime being gone.
pub(crate) struct Checked<C> {
    pub(crate) connection: C,
    pub(crate) clean: bool,
    runtime: Handle,
}

impl<C> Checked<C> {
    /// `connection`, just checked out for a statement of the current
    /// runtime (a deadpool manager's `create` runs on the statement's task).
    pub(crate) fn new(connection: C) -> Self {
        Self {
            connection,
            clean: true,
            runtime: Handle::current(),
        }
    }

    /// Whether the connection may serve another statement, for a deadpool
    /// manager's `recycle` (which runs on that statement's task): not if
    /// its last statement did not finish, nor once it was out for
    /// [`MAX_HOLD`]. Refused, it is dropped, which returns it to the sqlx
    /// pool. Kept, it now serves in the current runtime.
    pub(crate) fn recycle<E>(&mut self, metrics: &Metrics) -> RecycleResult<E> {
        if !self.clean {
            return Err(RecycleError::message("its last statement did not finish"));
        }
        if metrics.age() >= MAX_HOLD {
            return Err(RecycleError::message("held long enough"));
        }
        self.runtime = Handle::current();
        Ok(())
    }
}

impl<M> Kept<M>
where
    M: Manager + Send + Sync + 'static,
    M::Type: Send,
{
    /// Up to `hold` connections checked out by `manager`; `None` for none
    /// (or if deadpool refused its settings, which cannot happen without
    /// timeouts).
    pub(crate) fn new(manager: M, hold: u32) -> Option<Self> {
        if hold == 0 {
            return None;
        }
        let pool = managed::Pool::builder(manager)
            .max_size(usize::try_from(hold).unwrap_or(usize::MAX))
            .build()
            .ok()?;
        Some(Self {
            pool,
            sweeping: AtomicBool::new(false),
        })
    }

    /// Starts the task returning idle connections to `pool`, unless it
    /// runs, or `pool` is closed: the sweeper then returned everything,
    /// and every statement fails.
    pub(crate) fn start_sweeping<DB: sqlx::Database>(this: &Arc<Self>, pool: &sqlx::Pool<DB>) {
        if pool.is_closed()
            || this.sweeping.load(Ordering::Relaxed)
            || this.sweeping.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let running = SweepingFlag(Arc::downgrade(this));
        let closed = pool.close_event();
        tokio::spawn(async move {
            sweep(&running.0, closed).await;
            drop(running);
        });
    }

    /// Drops a store's kept connections, for its `Drop`. sqlx gives a
    /// connection back to its pool on a task of the current runtime, and
    /// panics where there is none. A store can outlive the `block_on` that
    /// used it (a `main` that builds its runtime by hand drops its locals
    /// outside it), so each kept connection then goes back on the runtime
    /// of the last statement it served (see [`Checked`]); if that
    /// runtime is gone too, the task never runs and the connection is
    /// closed (a PostgreSQL one broke with the runtime it was opened in).
    pub(crate) fn drop_outside_runtime<C>(kept: &mut Option<Arc<Self>>)
    where
        M: Manager<Type = Checked<C>>,
    {
        if Handle::try_current().is_ok() {
            return;
        }
        let Some(kept) = kept.take() else { return };
        // Out of the pool, so that each is dropped inside its own runtime.
        for connection in kept.pool.retain(|_, _| false).removed {
            let _context = connection.runtime.enter();
            drop(connection);
        }
    }
}

/// Clears the sweeping flag when the sweeper ends, also when its runtime
/// shuts down, so the next statement starts another.
struct SweepingFlag<M: Manager>(Weak<Kept<M>>);

impl<M: Manager> Drop for SweepingFlag<M> {
    fn drop(&mut self) {
        if let Some(kept) = self.0.upgrade() {
            kept.sweeping.store(false, Ordering::Release);
        }
    }
}

/// Every [`IDLE_RETURN`], returns idle connections to the sqlx pool; when
/// that pool closes, returns all of them; ends with the store.
async fn sweep<M: Manager>(kept: &Weak<Kept<M>>, closed: CloseEvent) {
    let mut ticker = tokio::time::interval(IDLE_RETURN);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(closed);
    loop {
        let pool_closed = tokio::select! {
            () = &mut closed => true,
            _ = ticker.tick() => false,
        };
        let Some(kept) = kept.upgrade() else { return };
        if pool_closed {
            kept.pool.close();
            return;
        }
        kept.pool
            .retain(|_, metrics| metrics.last_used() < IDLE_RETURN);
    }
}
