//! Whether PostgreSQL takes new connections, and why not.
//!
//! sqlx's pool takes a refused connection, a server starting up and one
//! with too many clients for a server about to come up: `acquire` tries
//! again, saying nothing, until its acquire timeout, and then reports only
//! that it timed out. While the database is unreachable, every statement
//! that needed a new connection waited out the engine's store timeout, and
//! the log said only that the store did not answer.
//!
//! So when a new connection is slow in coming ([`CHECK_AFTER`]), the store
//! connects once itself, with the pool's options, on a task of its own
//! (at most once a [`RECHECK`], whatever the number of statements waiting;
//! for no longer than the pool's acquire timeout): a failure is the cause,
//! logged when an outage begins or its cause changes, and once more when a
//! check connects again. While it stands, a claim that needs a new
//! connection fails at once with it (nothing has run: the client gets 503
//! and retries); the statements of a request whose handler runs or ran
//! wait for the pool as before, so that a short outage does not cost them
//! their lease or their stored response. None of this runs for a
//! statement that the pool has a connection ready for.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, Postgres};
use tokio::sync::watch;

use crate::engine::poll_once;
use crate::store::{Explained, StoreError, sql};

/// How long a new connection may take before the store checks whether the
/// server takes connections at all: far longer than connecting takes,
/// well under any store timeout.
const CHECK_AFTER: Duration = Duration::from_millis(100);
/// How often, at most, the store connects to check.
const RECHECK: Duration = Duration::from_secs(1);

/// How long a statement waits for a new connection while the server is
/// known not to take any.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Patience {
    /// It fails at once with the cause.
    FailFast,
    /// It waits for the pool, up to the engine's store timeout.
    WaitForServer,
}

/// What the last checks found, shared by the store's statements.
pub(super) struct Reachability {
    /// Why the last check could not connect; `None` until one fails, and
    /// again once one connects.
    outage: watch::Sender<Option<Arc<Unreachable>>>,
    /// When the next check may start.
    next_check: Mutex<Instant>,
}

/// PostgreSQL did not take a new connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {address}: {cause}")]
pub(super) struct Unreachable {
    address: String,
    cause: NotConnected,
}

/// Why a check did not connect.
#[derive(Debug, thiserror::Error)]
enum NotConnected {
    #[error(transparent)]
    Refused(sqlx::Error),
    /// Nothing answered within the pool's acquire timeout (a network that
    /// drops packets, a server that hangs).
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
}

/// Why no connection was acquired.
#[derive(Debug, thiserror::Error)]
pub(super) enum AcquireError {
    /// The pool failed (timed out, closed, a connection refused for good).
    #[error(transparent)]
    Pool(sqlx::Error),
    /// A check found that the server does not take connections.
    #[error(transparent)]
    Unreachable(Arc<Unreachable>),
}

impl From<AcquireError> for StoreError {
    fn from(error: AcquireError) -> Self {
        match error {
            AcquireError::Pool(error) => match refused_login(&error) {
                Some(fix) => Explained::misconfigured(error, fix),
                None if sql::error_code(&error).as_deref() == Some("28P01") => {
                    Explained::store_error(error, PASSWORD_REFUSED)
                }
                None => Self::backend(error),
            },
            AcquireError::Unreachable(unreachable) => Self::backend(unreachable),
        }
    }
}

/// What to change when the server refused a new connection's login, as
/// it does for good after a role or a database changed under a running
/// service; `None` for any other failure. A refused password is not one
/// of them: see [`PASSWORD_REFUSED`].
fn refused_login(error: &sqlx::Error) -> Option<&'static str> {
    match &*sql::error_code(error)? {
        "28000" => Some(
            "PostgreSQL refused the store's role for a new connection: create the role, or give the pool one that exists and may log in",
        ),
        "3D000" => Some(
            "the store's database no longer exists: create it, or give the pool one that exists",
        ),
        _ => None,
    }
}

/// What a refused password (SQLSTATE 28P01) means for a new connection of
/// a running service. It is told as an outage, since it often passes
/// without the store's setup changing: a password rotated on the server
/// a moment before the application hands the pool the new one
/// (`set_connect_options`), or a short-lived token (IAM, Vault) renewed a
/// little late. PostgreSQL also answers it for a role that no longer
/// exists, so as not to tell whether one does.
const PASSWORD_REFUSED: &str = "PostgreSQL refused the store's password for a new connection: if it lasts, give the pool the role's current password (`PgPool::set_connect_options`), or check that the role still exists";

impl Reachability {
    pub(super) fn new() -> Self {
        Self {
            outage: watch::Sender::new(None),
            next_check: Mutex::new(Instant::now()),
        }
    }

    /// A connection from `pool`. One the pool has ready is taken as it
    /// is: the rest runs only when the pool must open one, or wait for
    /// one to come back.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        pool: &PgPool,
        patience: Patience,
    ) -> Result<PoolConnection<Postgres>, AcquireError> {
        let mut acquire = pin!(pool.acquire());
        if let Poll::Ready(acquired) = poll_once(&mut acquire).await {
            return acquired.map_err(AcquireError::Pool);
        }
        // Boxed: only a statement that waits for a connection pays for
        // the size of what follows.
        Box::pin(self.wait_for_connection(acquire, pool, patience)).await
    }

    /// `acquire`, which did not have a connection ready, or the cause
    /// that keeps the server from taking one.
    async fn wait_for_connection<A>(
        self: &Arc<Self>,
        mut acquire: Pin<&mut A>,
        pool: &PgPool,
        patience: Patience,
    ) -> Result<PoolConnection<Postgres>, AcquireError>
    where
        A: Future<Output = Result<PoolConnection<Postgres>, sqlx::Error>>,
    {
        let mut outage = self.outage.subscribe();
        let known_down = outage.borrow().is_some();
        if !known_down {
            // Most likely a connection being opened: give it time.
            let grace = tokio::time::sleep(CHECK_AFTER);
            if let Ok(acquired) = acquired_before(&mut acquire, grace).await {
                return acquired.map_err(AcquireError::Pool);
            }
        }
        if self.check_is_due() {
            // A task of its own: a connection the pool comes up with first
            // must not cut the check short, or an outage it had recorded
            // would stand while the server takes connections again.
            let check = tokio::spawn(Arc::clone(self).check(pool.clone()));
            if let Ok(acquired) = acquired_before(&mut acquire, check).await {
                return acquired.map_err(AcquireError::Pool);
            }
        }
        if patience == Patience::WaitForServer {
            return acquire.await.map_err(AcquireError::Pool);
        }
        // Known down, or as soon as a check (this statement's or
        // another's) finds it so. The sender lives as long as `self`, so
        // this ends only with an outage.
        let down = async {
            let outage = outage.wait_for(Option::is_some).await.ok();
            outage.and_then(|outage| outage.clone())
        };
        match acquired_before(&mut acquire, down).await {
            Ok(acquired) => acquired.map_err(AcquireError::Pool),
            Err(Some(unreachable)) => Err(AcquireError::Unreachable(unreachable)),
            Err(None) => acquire.await.map_err(AcquireError::Pool),
        }
    }

    /// Whether this statement checks now: none started within [`RECHECK`].
    fn check_is_due(&self) -> bool {
        let mut next = self
            .next_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now < *next {
            return false;
        }
        *next = now + RECHECK;
        true
    }

    /// Connects once with the pool's options, for as long as the pool
    /// waits for a connection, and records what that says.
    async fn check(self: Arc<Self>, pool: PgPool) {
        let options = pool.connect_options();
        let patience = pool.options().get_acquire_timeout();
        let connecting = PgConnection::connect_with(&options);
        let cause = match tokio::time::timeout(patience, connecting).await {
            Ok(Ok(connection)) => {
                // Ended properly: the server logs a connection that just
                // drops.
                drop(connection.close().await);
                return self.record(None, &options);
            }
            // Not an outage, nor one still going on: the server took the
            // pool's own connections, all in use, which a statement waits
            // its turn for (see `is_refused_for_the_pools_own`).
            Ok(Err(error)) if is_refused_for_the_pools_own(&pool, &error) => {
                return self.record(None, &options);
            }
            Ok(Err(error)) => NotConnected::Refused(error),
            Err(_elapsed) => NotConnected::NoAnswer(patience),
        };
        let address = address(&options);
        self.record(Some(Arc::new(Unreachable { address, cause })), &options);
    }

    /// Records a check's outcome; logs an outage when it begins or its
    /// cause changes, and its end: once each, however many statements
    /// meet it.
    fn record(&self, outage: Option<Arc<Unreachable>>, options: &PgConnectOptions) {
        let changed = self.outage.send_if_modified(|current| {
            let same = match (&*current, &outage) {
                (None, None) => true,
                (Some(current), Some(new)) => current.cause.to_string() == new.cause.to_string(),
                _ => false,
            };
            if !same {
                current.clone_from(&outage);
            }
            !same
        });
        match (changed, outage) {
            (false, _) => {}
            (true, Some(unreachable)) => tracing::error!(
                error = %unreachable,
                "PostgreSQL does not take new connections; claims that need one fail at once until a check (every second at most) connects again"
            ),
            (true, None) => tracing::info!(
                address = address(options),
                "PostgreSQL takes new connections again"
            ),
        }
    }
}

/// Whether the server refused a connection for too many clients
/// (SQLSTATE 53300) while `pool` holds as many as it may open: a pool
/// filled under load, up to a limit the server counts its connections
/// against (the role's `CONNECTION LIMIT`, the database's, or
/// `max_connections` shared by the service's instances). Its statements
/// wait for one of its connections to come back, as they would from a
/// pool that may open no more, and do in a moment: taken for an outage,
/// each claim that found every connection busy failed at once (503), and
/// the log said that PostgreSQL took no connections.
fn is_refused_for_the_pools_own(pool: &PgPool, error: &sqlx::Error) -> bool {
    sql::error_code(error).as_deref() == Some("53300")
        && pool.size() >= pool.options().get_max_connections()
}

/// Where `options` connect: a socket's path, or `host:port` (an IPv6
/// host in brackets). Also what a first connection's error names.
pub(super) fn address(options: &PgConnectOptions) -> String {
    if let Some(socket) = options.get_socket() {
        return socket.display().to_string();
    }
    crate::store::host_and_port(options.get_host(), options.get_port())
}

/// `acquire`'s outcome if it comes before `other` ends, else `other`'s.
async fn acquired_before<A, B>(acquire: &mut A, other: B) -> Result<A::Output, B::Output>
where
    A: Future + Unpin,
    B: Future,
{
    tokio::select! {
        biased;
        acquired = acquire => Ok(acquired),
        other = other => Err(other),
    }
}
