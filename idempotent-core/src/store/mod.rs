//! Where records live.
//!
//! A [`Store`] keeps one [`Record`] per [`RecordKey`] and makes `claim`
//! atomic: of many concurrent claims on a new key exactly one is
//! [`Claim::Acquired`]. Every backend passes the same contract suite
//! (`idempotent_core::testing::contract`, feature `test-util`).
//!
//! Give one to [`Idempotency::new`](crate::Idempotency::new):
//!
//! | store | feature | records survive a restart | shared by instances |
//! |---|---|---|---|
//! | [`MemoryStore`] | (always) | no | no |
//! | [`Tiered`] (memory in front of a durable store) | (always) | as the durable store | as the durable store |
//! | `PostgresStore` | `postgres` | yes | yes |
//! | `RedisStore` | `redis` | as the Redis server is configured | yes |
//! | `SqliteStore` | `sqlite` | yes | processes on one machine |
//!
//! The SQL stores need their table: call `migrate()` once they are
//! opened (without it, every keyed request gets `500 store-misconfigured`,
//! and the log says to run it), and keep the `Reaper` of `spawn_reaper`
//! for as long as the server runs, or expired rows are never deleted:
//!
// The example needs `PostgresStore`, which only the `postgres` feature brings.
#![cfg_attr(feature = "postgres", doc = "```no_run")]
#![cfg_attr(not(feature = "postgres"), doc = "```ignore")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use idempotent_core::{Idempotency, store::PostgresStore};
//!
//! let store = PostgresStore::connect("postgres://app@db/app").await?;
//! store.migrate().await?;
//! let _reaper = store.spawn_reaper(Duration::from_secs(60));
//! let idempotency = Idempotency::new(store);
//! # let _ = idempotency;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::SharedClock;
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};

mod memory;
pub use memory::{MemoryStore, MemoryStoreBuilder};
mod tiered;
pub use tiered::{Tiered, TieredBuilder};
/// How long a store keeps a claim past its lease: the clock skew
/// tolerated between instances. A lapsed lease nobody took over is still
/// held, and its holder, whose renewals were held up for a moment (or
/// whose clock runs behind), may still complete it. Redis expires its
/// keys this long after their deadline; the SQL stores purge a claim
/// this long after its lease, and the memory store sweeps it no sooner.
const EXPIRY_GRACE: std::time::Duration = std::time::Duration::from_secs(60);
/// `host:port` as the stores' errors and logs name a server: an IPv6 host
/// in brackets, once (a URL's comes bracketed already, one set in code
/// bare), so that its port can be told from it.
#[cfg(any(feature = "postgres", feature = "redis"))]
fn host_and_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod kept;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub use sql::{InvalidTableName, Reaper};
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisStore, RedisStoreBuilder};
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::{SqliteStore, SqliteStoreBuilder};

/// A boxed error from a store backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The token does not hold the record's current lease: the lease expired
    /// and another request took the key over, or the record is gone.
    #[error("the lease on this idempotency record is no longer held by this request")]
    LeaseLost,
    /// The store did not answer within the configured timeout.
    #[error("the idempotency store did not answer within {0:?}")]
    Timeout(Duration),
    /// The backend failed (connection, query, protocol...), in a way that
    /// may pass by itself: the server is down, slow, full or busy, or
    /// refuses writes for a while (a standby or replica during a
    /// failover, a password rotated before the pool was given the new
    /// one).
    ///
    /// The backend's error is part of this one's message, so it is not
    /// also its [`source`](std::error::Error::source) (a report that walks
    /// the chain, as `anyhow` does, would print it twice): match the
    /// variant to reach it, to downcast it to `sqlx::Error`, say.
    #[error("the idempotency store failed: {0}")]
    Backend(BoxError),
    /// The store is set up wrongly, and fails the same way until someone
    /// changes its setup: a missing table or privilege, a read-only
    /// SQLite file, another application's value at a record's key, a role
    /// or database that does not exist. Retrying cannot help before then;
    /// the error says what to change. As for [`Backend`](Self::Backend),
    /// the cause is in the message, not the `source`.
    #[error("the idempotency store is set up wrongly: {0}")]
    Misconfigured(BoxError),
    /// A stored record could not be decoded.
    #[error(transparent)]
    Codec(#[from] crate::record::CodecError),
}

impl StoreError {
    /// Wraps any backend error.
    #[must_use]
    pub fn backend(error: impl Into<BoxError>) -> Self {
        Self::Backend(error.into())
    }

    /// Wraps a backend error that only a change of the store's setup
    /// makes go away (see [`StoreError::Misconfigured`]).
    #[must_use]
    pub fn misconfigured(error: impl Into<BoxError>) -> Self {
        Self::Misconfigured(error.into())
    }

    /// A record the store holds but cannot read back, for `reason`: a
    /// damaged row, another program's value at the record's address
    /// ([`StoreError::Codec`]). Its request ran, so it is answered 500
    /// `record-corrupt` and its handler is not run again, even with
    /// [`fail_open`](crate::IdempotencyBuilder::fail_open); reported as
    /// [`backend`](Self::backend) instead, it would be answered 503 and
    /// retried for good, or with `fail_open` run a second time.
    #[must_use]
    pub fn corrupt(reason: &'static str) -> Self {
        Self::Codec(crate::record::CodecError::new(reason))
    }
}

/// A backend for idempotency records.
///
/// Times come from the store's own [`Clock`](crate::clock::Clock), so tests
/// can move them without sleeping. Leases (`lease`) and result TTLs (`ttl`)
/// are separate: a lease is short and renewed while the handler runs; the
/// TTL is how long a finished response is replayed.
///
/// Its methods return `impl Future`, so it cannot be a trait object
/// (`Arc<dyn Store>`): a store chosen at run time is a [`SharedStore`],
/// `Arc<dyn DynStore>`, which [`Idempotency::from_shared`](crate::Idempotency::from_shared)
/// takes.
///
/// # Implementing a store
///
/// The record types are built with their constructors
/// ([`InFlight::new`](crate::record::InFlight::new),
/// [`Completed::new`](crate::record::Completed::new),
/// [`StoredResponse::new`](crate::record::StoredResponse::new),
/// [`Claim::in_flight`]); a store that keeps a completed record as one
/// value stores [`Completed::encode`](crate::record::Completed::encode).
/// Run the contract suite (`idempotent_core::testing::contract`, feature
/// `test-util`) against it. One process's store, on a map:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
/// use std::time::Duration;
///
/// use idempotent_core::Fingerprint;
/// use idempotent_core::clock::{Clock, SystemClock};
/// use idempotent_core::record::{Claim, Completed, InFlight, LeaseToken, Record, RecordKey, StoredResponse};
/// use idempotent_core::store::{Store, StoreError};
///
/// #[derive(Default)]
/// struct MapStore(Mutex<HashMap<RecordKey, Record>>);
///
/// fn ms(duration: Duration) -> u64 {
///     u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
/// }
///
/// impl MapStore {
///     /// Runs `change` on the record held by `token`, if it still is: its
///     /// lease may have lapsed, as long as no claim took the key over.
///     fn held<T>(
///         &self,
///         key: &RecordKey,
///         token: LeaseToken,
///         change: impl FnOnce(&mut HashMap<RecordKey, Record>, u64) -> T,
///     ) -> Result<T, StoreError> {
///         let now = SystemClock.now_millis();
///         let mut records = self.0.lock().unwrap();
///         match records.get(key) {
///             Some(Record::InFlight(held)) if held.lease_token == token => {
///                 Ok(change(&mut records, now))
///             }
///             _ => Err(StoreError::LeaseLost),
///         }
///     }
/// }
///
/// impl Store for MapStore {
///     async fn claim(&self, key: &RecordKey, fingerprint: Fingerprint, lease: Duration) -> Result<Claim, StoreError> {
///         let now = SystemClock.now_millis();
///         let mut records = self.0.lock().unwrap();
///         if let Some(record) = records.get(key).filter(|record| record.deadline() > now) {
///             return Ok(Claim::from(record.clone()));
///         }
///         let token = LeaseToken::random();
///         let held = InFlight::new(fingerprint, token, now.saturating_add(ms(lease)));
///         records.insert(key.clone(), Record::InFlight(held));
///         Ok(Claim::Acquired(token))
///     }
///
///     async fn renew(&self, key: &RecordKey, token: LeaseToken, lease: Duration) -> Result<(), StoreError> {
///         self.held(key, token, |records, now| {
///             if let Some(Record::InFlight(held)) = records.get_mut(key) {
///                 // Never earlier: a renewal held up on the way may arrive
///                 // after a later one.
///                 held.lease_expires_at = held.lease_expires_at.max(now.saturating_add(ms(lease)));
///             }
///         })
///     }
///
///     async fn complete(
///         &self,
///         key: &RecordKey,
///         token: LeaseToken,
///         response: StoredResponse,
///         ttl: Duration,
///     ) -> Result<(), StoreError> {
///         self.held(key, token, |records, now| {
///             let Some(Record::InFlight(held)) = records.remove(key) else { return };
///             let completed = Completed::new(held.fingerprint, response, now.saturating_add(ms(ttl)));
///             records.insert(key.clone(), Record::Completed(Arc::new(completed)));
///         })
///     }
///
///     async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
///         self.held(key, token, |records, _| {
///             records.remove(key);
///         })
///     }
///
///     async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
///         let now = SystemClock.now_millis();
///         let records = self.0.lock().unwrap();
///         Ok(records.get(key).filter(|record| record.deadline() > now).cloned())
///     }
/// }
///
/// let idempotency = idempotent_core::Idempotency::new(MapStore::default());
/// # let _ = idempotency;
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idempotency store",
    label = "not a `Store`",
    note = "a store is a `MemoryStore`, `PostgresStore`, `RedisStore`, `SqliteStore`, `Tiered` or a type of yours implementing `Store`; one already shared as a `SharedStore` (`Arc<dyn DynStore>`) goes to `Idempotency::from_shared(store)`, then `.build()`"
)]
pub trait Store: Send + Sync + 'static {
    /// Atomically claims `key` for a request with `fingerprint`:
    /// - no record, or an expired one: insert `InFlight` -> [`Claim::Acquired`];
    /// - `InFlight` whose lease has lapsed: take it over with a new token ->
    ///   [`Claim::Acquired`];
    /// - live `InFlight` -> [`Claim::InFlight`];
    /// - live `Completed` -> [`Claim::Completed`].
    ///
    /// The fingerprint is not compared here; the engine does that.
    ///
    /// # Errors
    /// [`StoreError::Backend`] or [`StoreError::Timeout`] when the backend
    /// failed, [`StoreError::Misconfigured`] when it is set up wrongly,
    /// [`StoreError::Codec`] when the record found cannot be read.
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Extends the lease held by `token` to `now + lease` (never to an
    /// earlier deadline than it has).
    ///
    /// A claim's token holds its record until the record is completed,
    /// released, taken over by a later claim, or removed: a lease that
    /// lapsed with no claim since is still held, and renewing it makes it
    /// live again. The engine renews, completes and releases after a lapse
    /// it could not help (renewals held back, a store outage), when
    /// nothing else can have run the request meanwhile; refused, its
    /// response would go unstored, and a retry would run it again.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `token` no longer holds the record.
    fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces the lease held by `token` (lapsed or not, see
    /// [`renew`](Self::renew)) with a `Completed` record kept for `ttl`
    /// from now, however much of the lease was left.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `token` no longer holds the record.
    fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the record held by `token` (lapsed or not, see
    /// [`renew`](Self::renew)), so the next claim runs again.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `token` no longer holds the record.
    fn release(
        &self,
        key: &RecordKey,
        token: LeaseToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the live record for `key`, if any: never one past its
    /// deadline. Besides inspection, the engine reads with it to answer an
    /// exact repeat of a replayed request, so a record returned here is
    /// replayed.
    ///
    /// # Errors
    /// As [`claim`](Self::claim)'s.
    fn get(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Waits for the work this store carries on in the background after a
    /// call has returned, such as releasing a claim whose caller stopped
    /// waiting for its answer (the engine's store timeout): cut short by
    /// the runtime stopping, that key would stay held until its lease
    /// lapsed. [`Idempotency::drain`](crate::Idempotency::drain) awaits it
    /// last. The default, for a store that does nothing in the background,
    /// returns at once.
    fn settle(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// The clock this store reads its deadlines from, if it has one. A
    /// [`Tiered`] cache built without a clock of its own expires records
    /// by it, so that it never replays a record after the durable store
    /// let it expire. The default, for a store that does not say, is
    /// `None`, and the cache then reads the system clock.
    fn deadline_clock(&self) -> Option<SharedClock> {
        None
    }
}

/// A backend's error, with what to change so that it goes away: the
/// driver's or server's own words say what failed, not which setting,
/// table or file to fix, and the log line is all an operator has.
#[cfg(any(feature = "postgres", feature = "redis", feature = "sqlite"))]
#[derive(Debug, thiserror::Error)]
#[error("{cause}: {hint}")]
pub(crate) struct Explained<E> {
    cause: E,
    hint: String,
}

#[cfg(any(feature = "postgres", feature = "redis", feature = "sqlite"))]
impl<E: std::error::Error + Send + Sync + 'static> Explained<E> {
    /// `cause`, told with `hint`, of a failure that may pass by itself
    /// (a server down or full): [`StoreError::Backend`].
    pub(crate) fn store_error(cause: E, hint: impl Into<String>) -> StoreError {
        StoreError::backend(Self::new(cause, hint))
    }

    /// `cause`, told with `hint`, of a store set up wrongly, which fails
    /// the same way until `hint` is followed:
    /// [`StoreError::Misconfigured`].
    pub(crate) fn misconfigured(cause: E, hint: impl Into<String>) -> StoreError {
        StoreError::misconfigured(Self::new(cause, hint))
    }

    fn new(cause: E, hint: impl Into<String>) -> Self {
        Self {
            cause,
            hint: hint.into(),
        }
    }
}

/// Waits for the tasks `tracker` holds, and for those it is given
/// meanwhile: what a store that spawns its background work on `tracker`
/// answers [`Store::settle`] with.
#[cfg(any(feature = "postgres", feature = "redis", feature = "sqlite"))]
pub(crate) async fn settle(tracker: &tokio_util::task::TaskTracker) {
    // `wait` ends only on a closed tracker; closing does not stop new
    // tasks from being tracked, so it stays closed. Reopening it would
    // leave a concurrent settle, between its own close and wait, waiting
    // for a close that never comes.
    tracker.close();
    tracker.wait().await;
}

/// A boxed future, as [`DynStore`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe form of [`Store`], implemented for every `Store`, so the
/// engine can hold any backend behind one `Arc<dyn DynStore>`. Implement
/// [`Store`], not this: each method boxes the future of the `Store`
/// method of its name, and does what that method's documentation says.
/// [`Store::deadline_clock`] has no counterpart here.
///
/// It is sealed: the one implementation is the one every `Store` has, so
/// that methods can be added to it (as they are to `Store`, with a default)
/// without breaking anyone.
pub trait DynStore: sealed::Sealed + Send + Sync + 'static {
    /// [`Store::claim`], boxed.
    fn claim<'a>(
        &'a self,
        key: &'a RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    /// [`Store::renew`], boxed.
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// [`Store::complete`], boxed.
    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// [`Store::release`], boxed.
    fn release<'a>(
        &'a self,
        key: &'a RecordKey,
        token: LeaseToken,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// [`Store::get`], boxed.
    fn get<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;
    /// [`Store::settle`], boxed.
    fn settle(&self) -> BoxFuture<'_, ()>;
}

mod sealed {
    /// Keeps [`DynStore`](super::DynStore) implemented only through
    /// [`Store`](super::Store).
    pub trait Sealed {}
    impl<S: super::Store> Sealed for S {}
}

/// [`DynStore`] is implemented through [`Store`] alone; a type that
/// implements it directly is refused:
///
/// ```compile_fail,E0277
/// use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
/// use idempotent_core::store::{BoxFuture, DynStore, StoreError};
/// use idempotent_core::Fingerprint;
/// use std::time::Duration;
///
/// struct Direct;
///
/// impl DynStore for Direct {
///     fn claim<'a>(&'a self, _: &'a RecordKey, _: Fingerprint, _: Duration) -> BoxFuture<'a, Result<Claim, StoreError>> { todo!() }
///     fn renew<'a>(&'a self, _: &'a RecordKey, _: LeaseToken, _: Duration) -> BoxFuture<'a, Result<(), StoreError>> { todo!() }
///     fn complete<'a>(&'a self, _: &'a RecordKey, _: LeaseToken, _: StoredResponse, _: Duration) -> BoxFuture<'a, Result<(), StoreError>> { todo!() }
///     fn release<'a>(&'a self, _: &'a RecordKey, _: LeaseToken) -> BoxFuture<'a, Result<(), StoreError>> { todo!() }
///     fn get<'a>(&'a self, _: &'a RecordKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> { todo!() }
///     fn settle(&self) -> BoxFuture<'_, ()> { todo!() }
/// }
/// ```
#[cfg(doctest)]
pub struct DynStoreIsSealed;

impl<S: Store> DynStore for S {
    fn claim<'a>(
        &'a self,
        key: &'a RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(Store::claim(self, key, fingerprint, lease))
    }
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::renew(self, key, token, lease))
    }
    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::complete(self, key, token, response, ttl))
    }
    fn release<'a>(
        &'a self,
        key: &'a RecordKey,
        token: LeaseToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::release(self, key, token))
    }
    fn get<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(Store::get(self, key))
    }
    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(Store::settle(self))
    }
}

/// A shared, type-erased store: for a backend chosen at run time, or an
/// application state that holds the store and whose tests put a
/// `MockStore` in it. Build the layer on it with
/// [`Idempotency::from_shared`](crate::Idempotency::from_shared), then
/// `build()`: it does not implement [`Store`], so `Idempotency::new`
/// refuses it.
///
/// ```
/// use std::sync::Arc;
/// use idempotent_core::Idempotency;
/// use idempotent_core::store::{MemoryStore, SharedStore};
///
/// #[derive(Clone)]
/// struct AppState { store: SharedStore }
///
/// let state = AppState { store: Arc::new(MemoryStore::new()) };
/// let idempotency = Idempotency::from_shared(state.store.clone()).build();
/// # let _ = idempotency;
/// ```
pub type SharedStore = Arc<dyn DynStore>;

#[cfg(all(test, any(feature = "postgres", feature = "redis", feature = "sqlite")))]
mod tests {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio_util::task::TaskTracker;

    use super::StoreError;

    /// A report that walks the error chain (`anyhow`, `eyre`) prints the
    /// backend's error once: in the message, not again as its source.
    #[test]
    fn a_backend_error_is_told_once_along_the_chain() {
        let cause = || std::io::Error::other("connection refused");
        for error in [
            StoreError::backend(cause()),
            StoreError::misconfigured(cause()),
        ] {
            let mut told = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(next) = source {
                told.push_str(&format!(": {next}"));
                source = next.source();
            }
            assert_eq!(told.matches("connection refused").count(), 1, "{told}");
        }
        let StoreError::Backend(inner) = StoreError::backend(cause()) else {
            unreachable!("built as Backend")
        };
        assert!(inner.downcast_ref::<std::io::Error>().is_some());
    }

    /// Two callers settling at once, with nothing to wait for, both return:
    /// neither is left waiting on a tracker the other's end reopened.
    #[test]
    fn concurrent_settles_both_return() {
        let tracker = TaskTracker::new();
        let barrier = Barrier::new(2);
        let hung = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap();
                    for _ in 0..50_000 {
                        barrier.wait();
                        let settle = super::settle(&tracker);
                        let settled = runtime.block_on(async {
                            tokio::time::timeout(Duration::from_millis(50), settle).await
                        });
                        if settled.is_err() {
                            hung.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            hung.into_inner(),
            0,
            "settles left waiting on an empty tracker"
        );
    }
}
