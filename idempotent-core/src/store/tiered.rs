//! An in-memory cache of completed records in front of a durable store.
//!
//! A completed record never changes until it expires, so once this process
//! has seen one, replays of it are answered from memory without a round
//! trip. Everything else (claims of unknown or in-flight keys, renewals,
//! completion, release) goes to the durable store, which alone decides who
//! holds a key. A cached record expires at its own `expires_at`, which is
//! never later than the durable copy's, so the cache cannot replay a record
//! the durable store has already forgotten.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use super::{Store, StoreError};
use crate::clock::{Clock, SharedClock, SystemClock, millis};
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};

const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// What a cached entry costs beyond its body and headers, rounded up.
const ENTRY_OVERHEAD_BYTES: usize = 256;
/// Claims this process holds, remembered so that a completion can be cached
/// right away. Bounded: a forgotten claim only means the first replay of its
/// record reads the durable store.
const MAX_HELD_CLAIMS: u64 = 100_000;
const HELD_CLAIM_IDLE: Duration = Duration::from_secs(3600);

/// A [`Store`] that replays completed records from memory and defers
/// everything else to `durable`.
///
/// ```
/// use idempotent_core::store::{MemoryStore, Tiered};
///
/// // Usually the durable tier is PostgreSQL or Redis.
/// let store = Tiered::builder(MemoryStore::new()).max_bytes(32 * 1024 * 1024).build();
/// # let _ = store;
/// ```
pub struct Tiered<D> {
    durable: D,
    completed: Cache<RecordKey, Arc<Completed>>,
    held: Cache<RecordKey, (LeaseToken, Fingerprint)>,
    clock: SharedClock,
}

impl<D: std::fmt::Debug> std::fmt::Debug for Tiered<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiered")
            .field("durable", &self.durable)
            .field("cached_entries", &self.completed.entry_count())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Tiered`] store.
#[derive(Debug)]
#[must_use]
pub struct TieredBuilder<D> {
    durable: D,
    max_bytes: u64,
    clock: SharedClock,
}

impl<D: Store> TieredBuilder<D> {
    /// Caps the memory the cache may take (default 64 MiB).
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The clock that decides cache expiry (default: the system clock).
    /// Use the durable store's clock, so both agree on when records expire.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> Tiered<D> {
        let completed = Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|_key: &RecordKey, record: &Arc<Completed>| weight(record))
            .expire_after(UntilExpiry {
                clock: self.clock.clone(),
            })
            .build();
        let held = Cache::builder()
            .max_capacity(MAX_HELD_CLAIMS)
            .time_to_idle(HELD_CLAIM_IDLE)
            .build();
        Tiered {
            durable: self.durable,
            completed,
            held,
            clock: self.clock,
        }
    }
}

impl<D: Store> Tiered<D> {
    /// A cache with default settings in front of `durable`.
    pub fn new(durable: D) -> Self {
        Self::builder(durable).build()
    }

    /// Starts building a cache in front of `durable`.
    pub fn builder(durable: D) -> TieredBuilder<D> {
        TieredBuilder {
            durable,
            max_bytes: DEFAULT_MAX_BYTES,
            clock: Arc::new(SystemClock),
        }
    }

    /// The durable tier.
    pub fn durable(&self) -> &D {
        &self.durable
    }

    /// Completed records currently cached (after pending evictions run).
    #[must_use]
    pub fn cached_len(&self) -> u64 {
        self.completed.run_pending_tasks();
        self.completed.entry_count()
    }

    fn cached(&self, key: &RecordKey) -> Option<Arc<Completed>> {
        let record = self.completed.get(key)?;
        if record.expires_at > self.clock.now_millis() {
            return Some(record);
        }
        self.completed.invalidate(key);
        None
    }

    fn remember(&self, key: &RecordKey, record: &Arc<Completed>) {
        self.completed.insert(key.clone(), Arc::clone(record));
    }
}

impl<D: Store> Store for Tiered<D> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        if let Some(record) = self.cached(key) {
            return Ok(Claim::Completed(record));
        }
        let claim = self.durable.claim(key, fingerprint, lease).await?;
        match &claim {
            Claim::Completed(record) => self.remember(key, record),
            Claim::Acquired(token) => self.held.insert(key.clone(), (*token, fingerprint)),
            Claim::InFlight { .. } => {}
        }
        Ok(claim)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.durable.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // Read before the durable write, so the cached deadline is never
        // later than the one the durable store computes.
        let expires_at = self.clock.now_millis().saturating_add(millis(ttl));
        let cached = self
            .held
            .remove(key)
            .filter(|(held, _)| *held == token)
            .map(|(_, fingerprint)| Completed {
                fingerprint,
                response: response.clone(),
                expires_at,
            });
        self.durable.complete(key, token, response, ttl).await?;
        if let Some(record) = cached {
            self.remember(key, &Arc::new(record));
        }
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.held.remove(key);
        self.durable.release(key, token).await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        if let Some(record) = self.cached(key) {
            return Ok(Some(Record::Completed(record)));
        }
        let record = self.durable.get(key).await?;
        if let Some(Record::Completed(completed)) = &record {
            self.remember(key, completed);
        }
        Ok(record)
    }
}

fn weight(record: &Completed) -> u32 {
    let bytes = record.response.size_bytes() + ENTRY_OVERHEAD_BYTES;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Evicts each cached record when its own deadline passes. moka keeps its
/// own monotonic time, so [`Tiered::cached`] also checks the deadline
/// against the store's clock on every read.
struct UntilExpiry {
    clock: SharedClock,
}

impl Expiry<RecordKey, Arc<Completed>> for UntilExpiry {
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
