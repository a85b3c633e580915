//! An in-memory cache of completed records in front of a durable store.
//!
//! A completed record never changes until it expires, so once this process
//! has seen one, replays of it are answered from memory without a round
//! trip. Everything else (claims of unknown or in-flight keys, renewals,
//! completion, release) goes to the durable store, which alone decides who
//! holds a key. A cached record expires at its own `expires_at`, which is
//! never later than the durable copy's, so the cache cannot replay a record
//! the durable store has already let expire.
//!
//! Nothing tells the cache of a record the durable store loses before its
//! deadline: a Redis that restarts without persistence or evicts keys, a
//! key an operator deletes so that a client may run a request again. Each
//! instance that cached the record replays it to the same payload until
//! its deadline, while the others run the request again. A request with
//! another payload, which the cached record would answer 422, is asked of
//! the durable store instead, so that it runs (once, under the durable
//! store's claim) or gets what the durable store holds now; while the
//! durable store cannot answer, the cached record answers it (422). Keep the
//! durable store from losing records; delete a record by hand only with
//! every instance restarted, or wait for its deadline.

use std::sync::Arc;
use std::time::Duration;

use super::memory::{Inner, MemoryStore};
use super::{Store, StoreError};
use crate::clock::{Clock, SharedClock, SystemClock, millis};
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};

const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// A [`Store`] that replays completed records from memory and defers
/// everything else to `durable`.
///
/// The memory tier is a [`MemoryStore`]'s tables: completed records, bounded
/// by bytes and each expiring at the durable copy's deadline, and the claims
/// this process holds, so that a completion can be cached right away.
///
/// ```
/// use idempotent_core::store::{MemoryStore, Tiered};
///
/// // Usually the durable tier is PostgreSQL or Redis.
/// let store = Tiered::builder(MemoryStore::new()).max_bytes(32 * 1024 * 1024).build();
/// # let _ = store;
/// ```
///
/// Clones share the cache, as [`MemoryStore`]'s clones share their records,
/// and clone the durable tier (whose clones share their connections).
#[derive(Clone)]
pub struct Tiered<D> {
    durable: D,
    cache: MemoryStore,
    clock: SharedClock,
}

impl<D: std::fmt::Debug> std::fmt::Debug for Tiered<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiered")
            .field("durable", &self.durable)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Tiered`] store.
#[derive(Debug)]
#[must_use]
pub struct TieredBuilder<D> {
    durable: D,
    max_bytes: u64,
    clock: Option<SharedClock>,
}

impl<D: Store> TieredBuilder<D> {
    /// Caps the memory cached records may take (default 64 MiB); the ones
    /// closest to their deadline go first when it is full.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The clock that decides cache expiry (default: the durable store's
    /// [`deadline_clock`](Store::deadline_clock), or the system clock if
    /// it has none). Use the durable store's clock, so both agree on when
    /// records expire.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Builds the store.
    #[must_use]
    pub fn build(self) -> Tiered<D> {
        let clock = self
            .clock
            .or_else(|| self.durable.deadline_clock())
            .unwrap_or_else(|| Arc::new(SystemClock));
        let cache = MemoryStore::builder()
            .cache()
            .max_bytes(self.max_bytes)
            .shared_clock(clock.clone())
            .build();
        Tiered {
            durable: self.durable,
            cache,
            clock,
        }
    }
}

impl<D: Store> Tiered<D> {
    /// A cache with default settings in front of `durable`.
    #[must_use]
    pub fn new(durable: D) -> Self {
        Self::builder(durable).build()
    }

    /// Starts building a cache in front of `durable`.
    pub fn builder(durable: D) -> TieredBuilder<D> {
        TieredBuilder {
            durable,
            max_bytes: DEFAULT_MAX_BYTES,
            clock: None,
        }
    }

    /// The durable tier.
    pub fn durable(&self) -> &D {
        &self.durable
    }

    /// Completed records currently cached (expired ones not yet purged
    /// included).
    #[must_use]
    pub fn cached_len(&self) -> u64 {
        self.cache.completed_len()
    }

    /// The cached record of `key`, if it has one that has not expired. A
    /// record the cache cannot decode is treated as absent: the durable
    /// tier still has it.
    fn cached(&self, key: &RecordKey) -> Option<Arc<Completed>> {
        match self.cache.inner().get(key) {
            Ok(Some(Record::Completed(record))) => Some(record),
            _ => None,
        }
    }
}

/// The cache's hold on a key this process claimed. Dropped without
/// [`keep`](Self::keep), because the durable store refused the record or
/// the call was cut short (the engine's store timeout), it releases the
/// key at once, rather than leave it until its lease lapses.
struct Hold<'a> {
    cache: Option<&'a Inner>,
    key: &'a RecordKey,
    token: LeaseToken,
}

impl Hold<'_> {
    /// Caches the record the durable store kept.
    fn keep(mut self, response: StoredResponse, now: u64, expires_at: u64) {
        if let Some(cache) = self.cache.take() {
            let _ = cache.complete(self.key, self.token, response, now, expires_at);
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take() {
            let _ = cache.release(self.key, self.token);
        }
    }
}

impl<D: Store> Store for Tiered<D> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        // A cached record of another payload would be answered 422; the
        // durable store may since have lost or replaced it (see the
        // module's documentation), and such mismatches are rare enough to
        // cost it a round trip.
        let cached = self.cached(key);
        if let Some(record) = &cached
            && record.fingerprint == fingerprint
        {
            return Ok(Claim::Completed(Arc::clone(record)));
        }
        let claim = match self.durable.claim(key, fingerprint, lease).await {
            Ok(claim) => claim,
            // A durable store that cannot answer leaves the cached record
            // the best knowledge of the key: its 422 stands, rather than a
            // 503, or a run of the other payload under `fail_open`.
            Err(error) => return cached.map(Claim::Completed).ok_or(error),
        };
        match &claim {
            Claim::Completed(record) => self.cache.inner().remember(key, record),
            Claim::Acquired(token) => self.cache.inner().hold(key, *token, fingerprint, lease),
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
        // Read before the durable write, so the hold never outlasts the
        // durable lease by more than the time the renewal took.
        let expires_at = self.clock.now_millis().saturating_add(millis(lease));
        self.durable.renew(key, token, lease).await?;
        // A hold already gone (lapsed, or the key taken over) only costs
        // the completion its place in the cache.
        let _ = self.cache.inner().renew(key, token, expires_at);
        Ok(())
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
        let now = self.clock.now_millis();
        let expires_at = now.saturating_add(millis(ttl));
        let hold = Hold {
            cache: Some(self.cache.inner()),
            key,
            token,
        };
        let completed = self
            .durable
            .complete(key, token, response.clone(), ttl)
            .await;
        // A claim this process no longer holds (`LeaseLost`) is simply not
        // cached; the durable store's answer is the one that counts.
        if completed.is_ok() {
            hold.keep(response, now, expires_at);
        }
        completed
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let _ = self.cache.inner().release(key, token);
        self.durable.release(key, token).await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        if let Some(record) = self.cached(key) {
            return Ok(Some(Record::Completed(record)));
        }
        let record = self.durable.get(key).await?;
        if let Some(Record::Completed(completed)) = &record {
            self.cache.inner().remember(key, completed);
        }
        Ok(record)
    }

    async fn settle(&self) {
        self.durable.settle().await;
    }

    fn deadline_clock(&self) -> Option<SharedClock> {
        Some(self.clock.clone())
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use super::*;
    use crate::key::IdempotencyKey;
    use crate::scope::ScopeDigest;
    use crate::testing::MockStore;

    const FINGERPRINT: Fingerprint = Fingerprint::from_bytes([1; 32]);
    const LEASE: Duration = Duration::from_secs(60);

    /// A cache over a mock, and a key it claimed: the mock to steer, the
    /// store, the key and the claim's token.
    async fn claimed() -> (MockStore, Tiered<MockStore>, RecordKey, LeaseToken) {
        let durable = MockStore::new();
        let store = Tiered::new(durable.clone());
        let key = RecordKey::new(ScopeDigest::global(), IdempotencyKey::parse(b"k").unwrap());
        let Ok(Claim::Acquired(token)) = store.claim(&key, FINGERPRINT, LEASE).await else {
            panic!("a new key is acquired");
        };
        (durable, store, key, token)
    }

    #[tokio::test(start_paused = true)]
    async fn a_completion_cut_short_lets_go_of_the_cached_hold() {
        let (durable, store, key, token) = claimed().await;
        assert_eq!(store.cache.in_flight_len(), 1);
        let response = StoredResponse {
            status: http::StatusCode::OK,
            headers: Vec::new(),
            body: Some(bytes::Bytes::from_static(b"{}")),
        };
        durable.set_delay(Duration::from_secs(3600));
        let completing = store.complete(&key, token, response, Duration::from_secs(60));
        let cut_short = tokio::time::timeout(Duration::from_secs(2), completing).await;
        assert!(
            cut_short.is_err(),
            "the durable write answers after the timeout"
        );
        assert_eq!(store.cache.in_flight_len(), 0, "the hold outlived its call");
    }

    fn named(name: &str) -> RecordKey {
        RecordKey::new(
            ScopeDigest::global(),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        )
    }

    /// A run cut short (its task dropped, as by a runtime that ended
    /// without `Idempotency::drain`) neither completes nor releases its
    /// claim. The cache's hold on it must lapse with the durable lease,
    /// as the memory store's own claims do, and go once such holds pile
    /// up: held for good, each took memory outside the byte budget until
    /// its key came back, which a key that never comes back never does.
    #[tokio::test]
    async fn the_holds_of_runs_cut_short_go_once_their_lease_lapsed() {
        let durable = MockStore::new();
        // One shard, which sweeps once 64 claims are in flight.
        let store = Tiered::builder(durable.clone())
            .max_bytes(1024 * 1024)
            .build();
        for i in 0..100 {
            let claimed = store
                .claim(&named(&format!("cut{i}")), FINGERPRINT, LEASE)
                .await;
            assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
        }
        let renewed = named("renewed");
        let Ok(Claim::Acquired(token)) = store.claim(&renewed, FINGERPRINT, LEASE).await else {
            panic!("a new key is acquired");
        };
        durable.advance(LEASE / 2);
        store.renew(&renewed, token, LEASE).await.unwrap();
        durable.advance(LEASE / 2);
        for i in 0..100 {
            let claimed = store
                .claim(&named(&format!("live{i}")), FINGERPRINT, LEASE)
                .await;
            assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
        }
        assert_eq!(
            store.cache.in_flight_len(),
            101,
            "the holds of the runs cut short stayed after their lease lapsed"
        );
        store
            .complete(&renewed, token, paid(), LEASE)
            .await
            .unwrap();
        assert_eq!(
            store.cached_len(),
            1,
            "the renewed claim's hold was dropped"
        );
    }

    fn paid() -> StoredResponse {
        StoredResponse {
            status: http::StatusCode::CREATED,
            headers: Vec::new(),
            body: Some(bytes::Bytes::from_static(b"paid")),
        }
    }

    /// Built without a clock, the cache must expire records when the mock's
    /// clock says they expire, not when the system clock does: a test that
    /// moves the mock past the TTL expects the key to run again.
    #[tokio::test]
    async fn a_cache_over_a_mock_store_expires_by_the_mocks_clock() {
        let (durable, store, key, token) = claimed().await;
        let ttl = Duration::from_secs(3600);
        store.complete(&key, token, paid(), ttl).await.unwrap();
        durable.advance(ttl);

        let again = store.claim(&key, FINGERPRINT, LEASE).await;
        assert!(matches!(again, Ok(Claim::Acquired(_))), "{again:?}");
    }

    /// A clone is the same store: a record completed through one is
    /// replayed from the other's memory, with the durable store down.
    #[tokio::test]
    async fn clones_share_the_cache() {
        let (durable, store, key, token) = claimed().await;
        let clone = store.clone();
        store
            .complete(&key, token, paid(), Duration::from_secs(3600))
            .await
            .unwrap();
        durable.fail_all(true);
        let replayed = clone.claim(&key, FINGERPRINT, LEASE).await;
        assert!(
            matches!(&replayed, Ok(Claim::Completed(record)) if record.response == paid()),
            "{replayed:?}"
        );
        assert_eq!(clone.cached_len(), 1);
    }

    /// A request with another payload under a cached key is asked of the
    /// durable store; when that store is down, the cached record still
    /// answers it (422), as a run under `fail_open` or a 503 would not.
    #[tokio::test]
    async fn a_mismatch_is_answered_from_the_cache_while_the_durable_store_is_down() {
        let (durable, store, key, token) = claimed().await;
        store
            .complete(&key, token, paid(), Duration::from_secs(3600))
            .await
            .unwrap();
        durable.fail_all(true);
        let other = Fingerprint::from_bytes([2; 32]);
        let answered = store.claim(&key, other, LEASE).await;
        assert!(
            matches!(&answered, Ok(Claim::Completed(record)) if record.fingerprint == FINGERPRINT),
            "{answered:?}"
        );
    }

    /// A completion the durable store refused is neither cached nor left
    /// held in memory: the next claim asks the durable store.
    #[tokio::test]
    async fn a_completion_the_durable_store_refused_is_not_cached() {
        let (durable, store, key, token) = claimed().await;
        durable.fail_next(crate::testing::OpKind::Complete);
        let completed = store
            .complete(&key, token, paid(), Duration::from_secs(3600))
            .await;
        assert!(completed.is_err(), "{completed:?}");
        assert_eq!((store.cached_len(), store.cache.in_flight_len()), (0, 0));
        let again = store.claim(&key, FINGERPRINT, LEASE).await;
        assert!(
            matches!(again, Ok(Claim::InFlight { .. })),
            "the durable store still holds the claim: {again:?}"
        );
    }
}
