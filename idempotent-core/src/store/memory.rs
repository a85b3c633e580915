//! The embedded default store, on moka.
//!
//! Completed records live in a moka cache bounded by bytes, each expiring at
//! its own deadline. In-flight claims live apart, in sharded maps that no
//! capacity bound touches: evicting a claim under memory pressure would let a
//! duplicate run the side effect a second time. Each shard's lock is held for
//! a few map operations and never across an `.await`, so claims on different
//! keys rarely contend and no global lock sits on the hot path.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use super::{Store, StoreError};
use crate::clock::{SharedClock, SystemClock, millis};
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, InFlight, LeaseToken, Record, RecordKey, StoredResponse};

const SHARDS: usize = 64;
const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// What a completed entry costs beyond its body and headers: the key, the
/// record and moka's own bookkeeping, rounded up.
const ENTRY_OVERHEAD_BYTES: usize = 256;

type InFlightShard = Mutex<HashMap<RecordKey, InFlight>>;

/// An in-memory [`Store`]: one process, lost on restart.
///
/// ```
/// use idempotent_core::store::MemoryStore;
///
/// let store = MemoryStore::builder().max_bytes(64 * 1024 * 1024).build();
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    in_flight: Box<[InFlightShard]>,
    hasher: RandomState,
    completed: Cache<RecordKey, Arc<Completed>>,
    clock: SharedClock,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("completed_entries", &self.inner.completed.entry_count())
            .field("completed_bytes", &self.inner.completed.weighted_size())
            .finish_non_exhaustive()
    }
}

/// Builds a [`MemoryStore`].
#[derive(Debug)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    clock: SharedClock,
}

impl MemoryStoreBuilder {
    /// Caps the memory completed records may take (default 256 MiB). When
    /// full, the least useful completed records are dropped; in-flight claims
    /// are never dropped.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The clock that decides expiry (default: the system clock).
    pub fn clock(mut self, clock: impl crate::clock::Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let clock = self.clock;
        let completed = Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|_key: &RecordKey, record: &Arc<Completed>| weight(record))
            .expire_after(ExpireAtDeadline {
                clock: clock.clone(),
            })
            .build();
        let in_flight = (0..SHARDS).map(|_| Mutex::default()).collect();
        let hasher = RandomState::new();
        MemoryStore {
            inner: Arc::new(Inner {
                in_flight,
                hasher,
                completed,
                clock,
            }),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with default settings.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts building a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: DEFAULT_MAX_BYTES,
            clock: Arc::new(SystemClock),
        }
    }

    /// Completed records currently held (after pending evictions run).
    #[must_use]
    pub fn completed_len(&self) -> u64 {
        self.inner.completed.run_pending_tasks();
        self.inner.completed.entry_count()
    }

    /// Claims currently in flight.
    #[must_use]
    pub fn in_flight_len(&self) -> usize {
        self.inner
            .in_flight
            .iter()
            .map(|shard| lock(shard).len())
            .sum()
    }

    /// Bytes of completed records currently held, by the store's own weighing.
    #[must_use]
    pub fn completed_bytes(&self) -> u64 {
        self.inner.completed.run_pending_tasks();
        self.inner.completed.weighted_size()
    }
}

impl Inner {
    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, HashMap<RecordKey, InFlight>> {
        let index = self.hasher.hash_one(key) as usize % self.in_flight.len();
        lock(&self.in_flight[index])
    }

    fn now(&self) -> u64 {
        self.clock.now_millis()
    }

    fn live_completed(&self, key: &RecordKey, now: u64) -> Option<Arc<Completed>> {
        let record = self.completed.get(key)?;
        if record.expires_at > now {
            return Some(record);
        }
        self.completed.invalidate(key);
        None
    }

    fn claim(&self, key: &RecordKey, fingerprint: Fingerprint, lease: Duration) -> Claim {
        let now = self.now();
        let mut shard = self.shard(key);
        if let Some(held) = shard.get(key).filter(|held| held.lease_expires_at > now) {
            return Claim::InFlight {
                fingerprint: held.fingerprint,
                lease_expires_at: held.lease_expires_at,
            };
        }
        if let Some(completed) = self.live_completed(key, now) {
            return Claim::Completed(completed);
        }
        let lease_token = LeaseToken::random();
        let lease_expires_at = now.saturating_add(millis(lease));
        shard.insert(
            key.clone(),
            InFlight {
                fingerprint,
                lease_token,
                lease_expires_at,
            },
        );
        Claim::Acquired(lease_token)
    }

    /// Runs `update` on the in-flight entry held by `token`, under its
    /// shard's lock.
    fn with_lease<T>(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        update: impl FnOnce(&mut HashMap<RecordKey, InFlight>) -> T,
    ) -> Result<T, StoreError> {
        let mut shard = self.shard(key);
        match shard.get(key) {
            Some(held) if held.lease_token == token => Ok(update(&mut shard)),
            _ => Err(StoreError::LeaseLost),
        }
    }
}

fn lock(shard: &InFlightShard) -> MutexGuard<'_, HashMap<RecordKey, InFlight>> {
    // A panic while holding a shard lock cannot leave a map half-updated
    // (each critical section is a single insert or remove), so a poisoned
    // lock is still safe to use.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

fn weight(record: &Completed) -> u32 {
    let bytes = record.response.size_bytes() + ENTRY_OVERHEAD_BYTES;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        Ok(self.inner.claim(key, fingerprint, lease))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let expires = self.inner.now().saturating_add(millis(lease));
        self.inner.with_lease(key, token, |shard| {
            if let Some(held) = shard.get_mut(key) {
                held.lease_expires_at = expires;
            }
        })
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let expires_at = inner.now().saturating_add(millis(ttl));
        inner.with_lease(key, token, |shard| {
            let Some(held) = shard.remove(key) else {
                return;
            };
            let fingerprint = held.fingerprint;
            // Inserted while the shard lock is held: a concurrent claim sees
            // either the lease or the completed record, never neither.
            let record = Completed {
                fingerprint,
                response,
                expires_at,
            };
            inner.completed.insert(key.clone(), Arc::new(record));
        })
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.with_lease(key, token, |shard| {
            shard.remove(key);
        })
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let now = self.inner.now();
        let shard = self.inner.shard(key);
        if let Some(held) = shard.get(key).filter(|held| held.lease_expires_at > now) {
            return Ok(Some(Record::InFlight(held.clone())));
        }
        Ok(self.inner.live_completed(key, now).map(Record::Completed))
    }
}

/// Expires each completed record at its own deadline. moka measures with
/// its own monotonic clock, so this only bounds memory; [`Inner::live_completed`]
/// checks the deadline against the store's clock on every read.
struct ExpireAtDeadline {
    clock: SharedClock,
}

impl Expiry<RecordKey, Arc<Completed>> for ExpireAtDeadline {
    fn expire_after_create(
        &self,
        _key: &RecordKey,
        record: &Arc<Completed>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let remaining = record.expires_at.saturating_sub(self.clock.now_millis());
        Some(Duration::from_millis(remaining))
    }

    fn expire_after_update(
        &self,
        key: &RecordKey,
        record: &Arc<Completed>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, record, updated_at)
    }
}
