//! An in-memory cache of completed records in front of a durable store.
//!
//! A completed record never changes until it expires, so once this process
//! has seen one, replays of it are answered from memory without a round
//! trip. A key this process holds (its request runs here, or its response
//! is being stored) is in flight until its lease lapses, also without a
//! round trip: a durable store that hangs would otherwise be cut short by
//! the engine's store timeout before memory could answer. Everything else
//! (claims of other keys, renewals, completion, release) goes to the
//! durable store, which alone decides who holds a key. A cached record
//! expires at its own `expires_at`, which is never later than the durable
//! copy's, so the cache cannot replay a record the durable store has
//! already let expire.
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
//!
//! While the durable store cannot answer, memory answers what it knows: a
//! cached record, and the keys this process holds, in flight until their
//! lease lapses (their requests run here, or their responses are being
//! stored). Any other claim fails as the durable store's did.

use std::sync::Arc;
use std::time::Duration;

use super::memory::MemoryStore;
use super::{Store, StoreError};
use crate::clock::{Clock, MonotonicClock, SharedClock, SystemClock, millis};
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};

const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The largest encoded record that every durable store of this crate
/// keeps whole: Redis takes no value over its `proto-max-bulk-len`, 1 MiB
/// at its least, nor one that overflows its `client-query-buffer-limit`,
/// also 1 MiB at its least, with the `\r\n` that ends the argument (2
/// bytes); PostgreSQL and SQLite keep near 1 GB. Past its limit a store
/// keeps the record without its body (answered 410). A larger completion
/// is not cached as it was sent, since the copy in memory would replay a
/// body the durable store may not have kept, while every other instance
/// answers 410: its first replay asks the durable store, and caches what
/// that store holds.
const KEPT_WHOLE_BYTES: usize = (1 << 20) - 2;

/// A [`Store`] that replays completed records from memory and defers
/// everything else to `durable`.
///
/// The memory tier is a [`MemoryStore`]'s tables: completed records, bounded
/// by bytes and each expiring at the durable copy's deadline, and the claims
/// this process holds, so that a completion can be cached right away. A
/// claim is held until its response is stored, by the first attempt or by
/// one the engine makes later, after its caller got the response (the
/// first ones failed in an outage), until the claim is released, or until
/// the durable store refuses it for good; cut short, it lapses with its
/// lease.
///
/// A completion whose record encodes to more than 1 MiB less 2 bytes is not
/// cached as sent: a durable store keeps a record over its own limit on
/// one value (Redis's `proto-max-bulk-len`, 1 MiB at its least, or its
/// `client-query-buffer-limit`, which the argument's ending `\r\n` also
/// fills) without its body, so such a record is cached once a replay has
/// read from the durable store what it kept.
///
/// # Clocks
///
/// None of the durable stores reads its server's clock: PostgreSQL, Redis
/// and SQLite compare deadlines with a `now` their own [`Clock`] gives
/// them, and the memory tier expires records by that same clock (the
/// durable store's [`deadline_clock`](Store::deadline_clock)) unless
/// [`TieredBuilder::clock`] gives it another. Read by that clock, a cached
/// record never outlives the durable copy: a completion's cached deadline
/// is read before the durable store reads its own (a step back of the
/// clock between the two reads aside), and a record learned from the
/// durable store keeps the durable deadline. So, whatever the clocks say:
///
/// - memory never lets a handler run: only a claim the durable store
///   grants does. The claims held in memory let a completion be cached,
///   only once the durable store has accepted it under the claim's own
///   lease; a claim of a key this process holds is answered from them,
///   in flight (409) until its lease lapses, rather than asked of a
///   durable store that may fail or hang, and so refused (503) or, under
///   `fail_open`, run a second time beside the run under way. A hold
///   lapses at its lease's deadline by that clock, or once the monotonic
///   clock has counted its lease since the claim or its last renewal,
///   whichever comes first: a clock set back (an NTP step) does not bring
///   back a hold that lapsed, whose key another instance may have taken
///   over since;
/// - a cached record is replayed only to its own payload: another payload
///   is asked of the durable store (and answered 422 from memory only
///   while that store cannot answer).
///
/// What clocks can do is make a replay stale. An instance (or a reaper
/// purging expired records) whose clock runs `d` ahead of this instance's
/// sees each record expire `d` sooner, and may run its key again; that
/// second run is the durable store's to allow, and it is why instances
/// must keep their clocks in sync. For up to `d` after it, this instance
/// goes on replaying the record it cached to retries of the same payload,
/// where the durable store would answer with the new run (409 while it
/// runs, its response after). That is the bound: a cached record is
/// replayed at most `d` past the moment any instance may take its key
/// over, `d` being how far the furthest-ahead clock among the instances
/// and reapers runs ahead of this one's. A clock given with
/// [`TieredBuilder::clock`] that runs `d` behind the durable store's adds
/// `d` to every record learned from that store; give none, or that store's.
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
    lapse_clock: Option<SharedClock>,
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

    /// The monotonic clock by which the holds of this process's claims
    /// also lapse (default: [`MonotonicClock`]), for tests that move a
    /// manual clock in its place.
    #[cfg(feature = "test-util")]
    #[doc(hidden)]
    pub fn lapse_clock(mut self, clock: impl Clock) -> Self {
        self.lapse_clock = Some(Arc::new(clock));
        self
    }

    /// Builds the store.
    #[must_use]
    pub fn build(self) -> Tiered<D> {
        let clock = self
            .clock
            .or_else(|| self.durable.deadline_clock())
            .unwrap_or_else(|| Arc::new(SystemClock));
        let lapse_clock = self
            .lapse_clock
            .unwrap_or_else(|| Arc::new(MonotonicClock::anchored_at(0)));
        let cache = MemoryStore::builder()
            .cache()
            .max_bytes(self.max_bytes)
            .shared_clock(clock.clone())
            .lapse_clock(lapse_clock)
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
            lapse_clock: None,
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

    /// What memory alone knows of `key`, read before a claim asks the
    /// durable store (a hold answers at once) and when the durable store
    /// could not answer it: its cached record, or this process's hold on it,
    /// whose lease has not lapsed. The hold stands for a claim the durable
    /// store granted and this process has neither released nor seen
    /// refused: its request still runs, or its response is being stored
    /// (an attempt whose answer was lost may already have stored it). Read
    /// again rather than before the durable call, which may have taken a
    /// store timeout: a record that expired meanwhile answers nothing.
    fn known_in_memory(&self, key: &RecordKey) -> Option<Claim> {
        self.cache.inner().get(key).ok().flatten().map(Claim::from)
    }
}

impl<D: Store> Store for Tiered<D> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let cached = match self.known_in_memory(key) {
            // A cached record of another payload would be answered 422;
            // the durable store may since have lost or replaced it (see
            // the module's documentation), and such mismatches are rare
            // enough to cost it a round trip.
            Some(Claim::Completed(record)) if record.fingerprint == fingerprint => {
                return Ok(Claim::Completed(record));
            }
            Some(Claim::Completed(record)) => Some(record),
            // A key this process holds is in flight until its lease
            // lapses, whatever the durable store would say: asked first, a
            // durable store that hangs rather than fails is cut short by
            // the engine's store timeout before memory is consulted, and
            // the retry is refused (503) or, under `fail_open`, run beside
            // the run under way.
            Some(held @ Claim::InFlight { .. }) => return Ok(held),
            _ => None,
        };
        let claim = match self.durable.claim(key, fingerprint, lease).await {
            Ok(claim) => claim,
            // A durable store that cannot answer leaves memory the best
            // knowledge of the key: a cached record's 422 stands, and a key
            // this process holds is in flight, rather than a 503, or under
            // `fail_open` a second run beside the one under way.
            Err(error) => return self.known_in_memory(key).ok_or(error),
        };
        match &claim {
            // The record memory holds already, answered to another payload:
            // nothing to learn. Learned again, each copy would be carved
            // from the cache's blocks behind the last, and a flood of
            // requests with other payloads would leave blocks kept whole
            // for the one copy still live in each, beyond the budget.
            Claim::Completed(record)
                if cached
                    .as_deref()
                    .is_some_and(|cached| same_record(cached, record)) => {}
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
        let lapses_at = self.cache.inner().lapse_deadline(lease);
        self.durable.renew(key, token, lease).await?;
        // A hold already gone (lapsed, or the key taken over) only costs
        // the completion its place in the cache.
        let _ = self.cache.inner().renew(key, token, expires_at, lapses_at);
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
        // Cut short here (the engine's store timeout), the call leaves the
        // hold as a failure that may pass does.
        let completed = self
            .durable
            .complete(key, token, response.clone(), ttl)
            .await;
        let cache = self.cache.inner();
        match &completed {
            Ok(()) => {
                if Completed::encoded_len_of(&response) > KEPT_WHOLE_BYTES {
                    let _ = cache.release(key, token);
                } else {
                    let _ = cache.complete(key, token, response, now, expires_at);
                }
            }
            // The engine tries again under the same lease, renewing it
            // meanwhile (a response stored later): the hold stays, so that
            // the attempt that stores the response caches it too. Let go
            // of, every replay of that response would go to the durable
            // store. Not stored after all, it lapses with its lease.
            Err(StoreError::Backend(_) | StoreError::Timeout(_)) => {}
            // A claim this process no longer holds (`LeaseLost`) is simply
            // not cached, the durable store's answer being the one that
            // counts; nor is one the store refuses every time alike.
            Err(_) => {
                let _ = cache.release(key, token);
            }
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

/// Whether `found` is `cached`, the record of a key as memory holds it: a
/// completed record does not change until its deadline, and one that
/// replaced it (its key run again once it expired) has a later deadline.
fn same_record(cached: &Completed, found: &Completed) -> bool {
    cached.expires_at == found.expires_at && cached.fingerprint == found.fingerprint
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use super::*;
    use crate::key::IdempotencyKey;
    use crate::scope::ScopeDigest;
    use crate::testing::MockStore;

    const FINGERPRINT: Fingerprint = Fingerprint::from_bytes([1; 32]);
    const LEASE: Duration = Duration::from_secs(60);
    const TTL: Duration = Duration::from_secs(3600);

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

    /// Asserts that `store` replays `paid()` to `key` from memory alone,
    /// with its durable store `durable` down.
    async fn replays_from_memory(durable: &MockStore, store: &Tiered<MockStore>, key: &RecordKey) {
        durable.fail_all(true);
        let replayed = store.claim(key, FINGERPRINT, LEASE).await;
        durable.fail_all(false);
        assert!(
            matches!(&replayed, Ok(Claim::Completed(record)) if record.response == paid()),
            "not answered from memory: {replayed:?}"
        );
    }

    /// The engine's first attempts at storing a response fail in an
    /// outage; it goes on trying under the same lease after its caller
    /// got the response. The attempt that stores it must cache it, as a
    /// completion stored at once is: its replays then come from memory.
    #[tokio::test]
    async fn a_response_stored_by_a_later_attempt_is_cached() {
        let (durable, store, key, token) = claimed().await;
        durable.fail_next(crate::testing::OpKind::Complete);
        let failed = store.complete(&key, token, paid(), TTL).await;
        assert!(matches!(failed, Err(StoreError::Backend(_))), "{failed:?}");
        store.complete(&key, token, paid(), TTL).await.unwrap();
        assert_eq!(store.cached_len(), 1, "the stored response was not cached");
        replays_from_memory(&durable, &store, &key).await;
    }

    /// As above, the first attempt cut short by the engine's store
    /// timeout (its future dropped) instead of failing.
    #[tokio::test(start_paused = true)]
    async fn a_response_stored_after_a_completion_cut_short_is_cached() {
        let (durable, store, key, token) = claimed().await;
        durable.set_delay(Duration::from_secs(3600));
        let completing = store.complete(&key, token, paid(), TTL);
        let cut_short = tokio::time::timeout(Duration::from_secs(2), completing).await;
        assert!(
            cut_short.is_err(),
            "the durable write answers after the timeout"
        );
        durable.set_delay(Duration::ZERO);
        store.complete(&key, token, paid(), TTL).await.unwrap();
        assert_eq!(store.cached_len(), 1, "the stored response was not cached");
        replays_from_memory(&durable, &store, &key).await;
    }

    /// A response stored later expires from memory when a response
    /// stored at once would: its deadline is read when the attempt that
    /// stored it began, as the durable store's is.
    #[tokio::test]
    async fn a_response_stored_later_expires_with_the_durable_copy() {
        let (durable, store, key, token) = claimed().await;
        durable.fail_next(crate::testing::OpKind::Complete);
        let _ = store.complete(&key, token, paid(), TTL).await;
        durable.advance(Duration::from_secs(5));
        store.complete(&key, token, paid(), TTL).await.unwrap();
        durable.advance(TTL - Duration::from_millis(1));
        replays_from_memory(&durable, &store, &key).await;
        durable.advance(Duration::from_millis(1));
        let again = store.claim(&key, FINGERPRINT, LEASE).await;
        assert!(matches!(again, Ok(Claim::Acquired(_))), "{again:?}");
    }

    /// A completion refused because another request took the key over
    /// lets go of the hold at once: nothing of it will be cached.
    #[tokio::test]
    async fn a_completion_refused_for_a_lost_lease_lets_go_of_the_hold() {
        let (durable, store, key, token) = claimed().await;
        durable.advance(LEASE);
        let taken_over = durable.claim(&key, FINGERPRINT, LEASE).await;
        assert!(
            matches!(taken_over, Ok(Claim::Acquired(_))),
            "{taken_over:?}"
        );
        let late = store.complete(&key, token, paid(), TTL).await;
        assert!(matches!(late, Err(StoreError::LeaseLost)), "{late:?}");
        assert_eq!((store.cached_len(), store.cache.in_flight_len()), (0, 0));
    }

    fn named(name: &str) -> RecordKey {
        RecordKey::new(
            ScopeDigest::global(),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        )
    }

    /// A run cut short (its task dropped, as by a runtime that ended
    /// without `Idempotency::drain`) neither completes nor releases its
    /// claim. The cache's hold on it must lapse with the durable lease
    /// and go once such holds pile up (at the lease: the durable store
    /// keeps the claim itself for the grace): held for good, each took memory outside the byte budget until
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

    /// With the durable store down, a key this process holds is in flight
    /// until its lease lapses: its request runs here, or its response is
    /// still being stored (the answer to an attempt lost). Refused, a retry
    /// got 503, and under `fail_open` ran the handler a second time.
    #[tokio::test]
    async fn a_key_held_here_is_in_flight_while_the_durable_store_is_down() {
        let (durable, store, key, token) = claimed().await;
        durable.fail_next(crate::testing::OpKind::Complete);
        let unstored = store.complete(&key, token, paid(), TTL).await;
        assert!(
            matches!(unstored, Err(StoreError::Backend(_))),
            "{unstored:?}"
        );
        durable.fail_all(true);
        let retry = store.claim(&key, FINGERPRINT, LEASE).await;
        assert!(
            matches!(retry, Ok(Claim::InFlight { fingerprint, .. }) if fingerprint == FINGERPRINT),
            "a retry of a request held here was not told it is in flight: {retry:?}"
        );
        durable.advance(LEASE);
        let lapsed = store.claim(&key, FINGERPRINT, LEASE).await;
        assert!(lapsed.is_err(), "a lapsed hold answered: {lapsed:?}");
    }

    /// A durable store that hangs, rather than fails, is cut short by the
    /// engine's store timeout, which drops the claim before memory is read:
    /// a retry of a key this process holds must be in flight at once.
    #[tokio::test(start_paused = true)]
    async fn a_key_held_here_is_in_flight_while_the_durable_store_hangs() {
        let (durable, store, key, _token) = claimed().await;
        durable.set_delay(Duration::from_secs(3600));
        let retry = store.claim(&key, FINGERPRINT, LEASE);
        let retry = tokio::time::timeout(Duration::from_secs(2), retry).await;
        assert!(
            matches!(retry, Ok(Ok(Claim::InFlight { fingerprint, .. })) if fingerprint == FINGERPRINT),
            "a retry of a request held here was not told it is in flight: {retry:?}"
        );
    }

    /// A cached record that expires while the durable store takes its
    /// time to fail answers nothing: a 422 from it would refuse a payload
    /// its key no longer binds.
    #[tokio::test(start_paused = true)]
    async fn a_record_expired_during_a_failing_durable_call_answers_nothing() {
        let (durable, store, key, token) = claimed().await;
        store.complete(&key, token, paid(), TTL).await.unwrap();
        durable.fail_all(true);
        durable.set_delay(Duration::from_secs(2));
        let expiring = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            durable.advance(TTL);
        };
        let other = Fingerprint::from_bytes([2; 32]);
        let (answered, ()) = tokio::join!(store.claim(&key, other, LEASE), expiring);
        assert!(
            answered.is_err(),
            "an expired record answered another payload: {answered:?}"
        );
    }

    /// A completion the durable store refused is not cached: the next
    /// claim asks the durable store, which still holds the claim.
    #[tokio::test]
    async fn a_completion_the_durable_store_refused_is_not_cached() {
        let (durable, store, key, token) = claimed().await;
        durable.fail_next(crate::testing::OpKind::Complete);
        let completed = store.complete(&key, token, paid(), TTL).await;
        assert!(completed.is_err(), "{completed:?}");
        assert_eq!(store.cached_len(), 0);
        let again = store.claim(&key, FINGERPRINT, LEASE).await;
        assert!(
            matches!(again, Ok(Claim::InFlight { .. })),
            "the durable store still holds the claim: {again:?}"
        );
    }
}
